"""The firmware of a simulated server: what it boots from the disk, by the server's architecture.

Hetzner's x86 servers (CX, CPX, CCX) boot by BIOS: the firmware runs the boot code in the MBR's first 440
bytes, which (GRUB's i386-pc boot.img) loads the core image from the bios-boot partition. The arm servers
(CAX) boot by UEFI: the firmware loads `EFI/BOOT/BOOTAA64.EFI` from the ESP. A disk whose boot loader is for
the other platform does not boot, as on the hardware. The fixture image (nix/fixtures/image) marks its boot
loader `nix-dabei fixture boot loader <platform>` where each firmware looks; a disk with no marker counts as
bootable on either (the tests' hand-made disks), so only a boot loader for the other platform is refused.
"""

from __future__ import annotations

from pathlib import Path

from dabei_firstboot.seed import SeedError, list_partitions

MARKER = b"nix-dabei fixture boot loader "
# The simulator's `architecture` of a server type -> the boot loader platform its firmware runs.
FIRMWARE = {"x86": "i386-pc", "arm": "arm64-efi"}
_ESP_NAMES = ("ESP", "esp", "EFI system partition")


class NotBootable(Exception):
    """The disk holds a boot loader this server's firmware cannot run."""


def _marker_at(disk: Path, offset: int) -> str | None:
    with open(disk, "rb") as f:
        f.seek(offset)
        head = f.read(len(MARKER) + 16)
    if not head.startswith(MARKER):
        return None
    words = head[len(MARKER) :].split(b"\x00", 1)[0].split()
    return words[0].decode("ascii", errors="replace") if words else None


def boot_loader(disk: Path) -> str | None:
    """The platform of the boot loader on `disk` (`i386-pc` or `arm64-efi`), None when not marked."""
    found = _marker_at(disk, 0)
    if found:
        return found
    try:
        partitions = list_partitions(disk)
    except SeedError:
        return None
    for part in partitions:
        if part["name"] in _ESP_NAMES:
            return _marker_at(disk, int(part["offset"]))
    return None


def check_bootable(disk: Path, architecture: str) -> None:
    """Raise NotBootable when `disk` carries a boot loader for another platform than `architecture`'s."""
    wanted = FIRMWARE.get(architecture)
    found = boot_loader(disk)
    if wanted is not None and found is not None and found != wanted:
        raise NotBootable(
            f"no bootable system: the disk's boot loader is for {found}, this {architecture} server's "
            f"firmware boots {wanted}"
        )
