# Facts of the written image, shared by the image builder (make-zfs-image.nix) and every host installed
# from it. They are read-only options in nixosModules.zfs-image: a host configuration that named another
# pool, dataset or host id would describe filesystems that do not exist on its disk, or make the initrd
# refuse the root pool (ZFS records the importing host's id; boot.zfs.forceImportRoot is false). They
# never change within a release line of nix-dabei; a change would need every host reinstalled.
{
  # networking.hostId of every installed host. The builder exports the pool, so the first boot imports it
  # whatever host id the build VM had; from then on the pool carries this id and imports only under it.
  hostId = "da8e1001";
  poolName = "rpool";
  poolProperties = { ashift = "12"; autotrim = "on"; };
  # `zpool create -O`: properties of the pool's root dataset. All but canmount are inherited by the
  # datasets below (canmount is never inherited in ZFS: non-mounting parents set it themselves).
  rootDatasetProperties = {
    compression = "zstd";
    acltype = "posixacl";
    xattr = "sa";
    dnodesize = "auto";
    normalization = "formD";
    relatime = "on";
    mountpoint = "none";
    canmount = "off";
  };
  # By name relative to the pool. null: a non-mounting parent (created with canmount=off
  # mountpoint=none); a path: mountpoint=legacy and a fileSystems entry. `local` holds what can be
  # rebuilt, `safe` what must be kept (the host's identity lives in safe/var, see firstboot.nix).
  datasets = {
    "local" = null;
    "local/root" = "/";
    "local/nix" = "/nix";
    "safe" = null;
    "safe/var" = "/var";
    "safe/home" = "/home";
  };
  blankSnapshot = "local/root@blank";
  espSizeMiB = 512;
  # Hetzner Cloud's disk; GRUB's BIOS core image goes here on x86.
  bootDevice = "/dev/sda";
  # Hetzner's x86 servers boot legacy BIOS, the Arm (CAX) servers UEFI.
  bootModeFor = isx86: if isx86 then "bios+uefi" else "uefi";
}
