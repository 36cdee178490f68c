"""CUDA-to-NVML device matching on recorded values (no GPU needed)."""

from __future__ import annotations

from node.nvml import CudaIdentity, NvmlDevice, cuda_bus_id, match, normal_bus_id, normal_uuid

# Recorded shapes of real values: NVML prints "GPU-"/"MIG-" UUIDs and 8-digit domains;
# torch prints a device's UUID without a prefix.
NVML = [
    NvmlDevice("GPU-1b6c2a4e-93f1-7c55-0d1e-5a2b3c4d5e6f", "00000000:18:00.0"),  # slow, PCI 0
    NvmlDevice("GPU-9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0", "00000000:3B:00.0"),  # fast, PCI 1
    NvmlDevice("MIG-0a1b2c3d-4e5f-5a6b-8c7d-9e0f1a2b3c4d", "00000000:3B:00.0"),
]


def test_fastest_first_order_maps_by_uuid_not_index() -> None:
    # CUDA's default order puts the faster GPU (NVML index 1) first.
    cuda = [CudaIdentity("9f8e7d6c-5b4a-3928-1706-f5e4d3c2b1a0"),
            CudaIdentity("1b6c2a4e-93f1-7c55-0d1e-5a2b3c4d5e6f")]
    assert match(cuda, NVML) == [NVML[1], NVML[0]]


def test_mig_instance_maps_to_its_own_uuid() -> None:
    assert match([CudaIdentity("MIG-0a1b2c3d-4e5f-5a6b-8c7d-9e0f1a2b3c4d")], NVML) == [NVML[2]]
    assert match([CudaIdentity("0a1b2c3d-4e5f-5a6b-8c7d-9e0f1a2b3c4d")], NVML) == [NVML[2]]


def test_bus_id_when_no_uuid_and_unknown_devices_stay_unmatched() -> None:
    by_bus = CudaIdentity(None, pci_domain=0, pci_bus=0x18, pci_device=0)
    assert cuda_bus_id(by_bus) == "0000:18:00.0"
    assert match([by_bus], NVML) == [NVML[0]]
    assert match([CudaIdentity("deadbeef"), CudaIdentity(None)], NVML) == [None, None]


def test_normal_forms() -> None:
    assert normal_uuid("GPU-ABC") == "abc" and normal_uuid("MIG-abc") == "abc"
    assert normal_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
