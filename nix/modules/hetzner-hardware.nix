# What a Hetzner Cloud server needs from the kernel: its disk (virtio-scsi /dev/sda) in the initrd and, on
# the Arm (CAX) servers, a console on the web console's screen.
{ lib, pkgs, modulesPath, ... }:
{
  imports = [ (modulesPath + "/profiles/qemu-guest.nix") ];
  boot.initrd.availableKernelModules = [ "ahci" "xhci_pci" "virtio_pci" "virtio_scsi" "sd_mod" "sr_mod" ];

  # The CAX console defaults to the serial port, which Hetzner's web console does not show: put it on the
  # screen and load the GPU driver early so the whole boot is visible (as srvos'
  # nixos/hardware/hetzner-cloud/arm.nix does).
  boot.kernelParams = lib.mkIf pkgs.stdenv.hostPlatform.isAarch64 [ "console=tty" ];
  boot.initrd.kernelModules = lib.mkIf pkgs.stdenv.hostPlatform.isAarch64 [ "virtio_gpu" ];
}
