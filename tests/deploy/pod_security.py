"""Kubernetes Pod Security Standards, "baseline" and "restricted", as offline checks.

The rules of https://kubernetes.io/docs/concepts/security/pod-security-standards/ (the
policy the PodSecurity admission controller enforces since Kubernetes 1.25), applied to one
pod spec. Each function returns the violations in words; an empty list means admitted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL",
                         "MKNOD", "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID",
                         "SYS_CHROOT"}
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range",
                "net.ipv4.ip_unprivileged_port_start", "net.ipv4.tcp_syncookies",
                "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout",
                "net.ipv4.tcp_keepalive_intvl", "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def _containers(pod: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for key in ("containers", "initContainers", "ephemeralContainers"):
        yield from pod.get(key) or []


def baseline_violations(pod: dict[str, Any]) -> list[str]:
    """What in ``pod`` (a PodSpec) the "baseline" level refuses."""
    out = [f"{k}: true" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    out += [f"hostPath volume {v['name']}" for v in pod.get("volumes") or [] if "hostPath" in v]
    pod_sc = pod.get("securityContext") or {}
    out += [f"unsafe sysctl {s['name']}" for s in pod_sc.get("sysctls") or []
            if s["name"] not in SAFE_SYSCTLS]
    for where, sc in [("pod", pod_sc)] + [(c["name"], c.get("securityContext") or {})
                                          for c in _containers(pod)]:
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: hostProcess")
        if (sc.get("seccompProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: seccomp Unconfined")
        selinux = sc.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            out.append(f"{where}: seLinuxOptions {selinux}")
        if (sc.get("appArmorProfile") or {}).get("type") == "Unconfined":
            out.append(f"{where}: AppArmor Unconfined")
    for c in _containers(pod):
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{c['name']}: privileged")
        added = set((sc.get("capabilities") or {}).get("add") or [])
        out += [f"{c['name']}: capability {cap}" for cap in sorted(added - BASELINE_CAPABILITIES)]
        if sc.get("procMount", "Default") != "Default":
            out.append(f"{c['name']}: procMount {sc['procMount']}")
        out += [f"{c['name']}: hostPort {p['hostPort']}" for p in c.get("ports") or []
                if p.get("hostPort")]
    return out


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """What in ``pod`` the "restricted" level refuses (baseline's rules included)."""
    out = baseline_violations(pod)
    out += [f"volume {v['name']}: {sorted(set(v) - {'name'})}" for v in pod.get("volumes") or []
            if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    pod_sc = pod.get("securityContext") or {}
    for c in _containers(pod):
        sc = {**pod_sc, **(c.get("securityContext") or {})}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation not false")
        if sc.get("runAsNonRoot") is not True or sc.get("runAsUser") == 0:
            out.append(f"{c['name']}: may run as root")
        if (sc.get("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: no RuntimeDefault seccomp profile")
        caps = c.get("securityContext", {}).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            out.append(f"{c['name']}: capabilities not dropped (ALL)")
        out += [f"{c['name']}: capability {a}" for a in caps.get("add") or []
                if a != "NET_BIND_SERVICE"]
    return out
