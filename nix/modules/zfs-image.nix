# The ZFS layout of the nix-dabei image and what the installed system needs to boot from it:
# GPT with a BIOS boot partition, an ESP (/boot), the 1 MiB `dabei-seed` partition and ZFS for the rest;
# GRUB for legacy BIOS (x86 servers boot this way on Hetzner) and removable-path UEFI (CAX servers).
{ config, lib, pkgs, ... }:
let
  cfg = config.nix-dabei;
  mountedDatasets = lib.filterAttrs (_: ds: ds.mountpoint != null) cfg.datasets;
  datasetType = lib.types.submodule {
    options = {
      mountpoint = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "Where the dataset is mounted (mountpoint=legacy, mounted by NixOS); null for a non-mounting parent.";
      };
      properties = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        default = { };
        example = { recordsize = "1M"; };
        description = "ZFS properties of this dataset (`zfs create -o`).";
      };
    };
  };
in
{
  options.nix-dabei = {
    poolName = lib.mkOption {
      type = lib.types.strMatching "[a-zA-Z][a-zA-Z0-9_.:-]*";
      default = "rpool";
      description = "Name of the ZFS pool on the image's last partition.";
    };
    poolProperties = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = { ashift = "12"; autotrim = "on"; };
      description = "Pool properties (`zpool create -o`).";
    };
    datasetProperties = lib.mkOption {
      type = lib.types.attrsOf lib.types.str;
      default = {
        compression = "zstd";
        acltype = "posixacl";
        xattr = "sa";
        dnodesize = "auto";
        normalization = "formD";
        relatime = "on";
        mountpoint = "none";
        canmount = "off";
      };
      description = "Properties of the pool's root dataset, inherited by every dataset (`zpool create -O`).";
    };
    datasets = lib.mkOption {
      type = lib.types.attrsOf datasetType;
      default = {
        "local" = { };
        "local/root".mountpoint = "/";
        "local/nix".mountpoint = "/nix";
        "safe" = { };
        "safe/var".mountpoint = "/var";
        "safe/home".mountpoint = "/home";
      };
      description = ''
        Datasets, by name relative to the pool. Parents without a mountpoint are created with
        canmount=off (inherited from the pool root); mounted datasets get mountpoint=legacy and a
        `fileSystems` entry. `local` holds what can be rebuilt, `safe` what must be kept.
      '';
    };
    blankSnapshot = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "local/root@blank";
      description = "Snapshot taken right after the datasets are created (before installing), or null.";
    };
    imageSizeMiB = lib.mkOption {
      type = lib.types.ints.between 2048 262144;
      default = 6144;
      description = "Size of the raw image in MiB; the ZFS partition grows to the whole disk on first boot.";
    };
    espSizeMiB = lib.mkOption {
      type = lib.types.ints.between 64 4096;
      default = 512;
      description = "Size of the ESP, mounted at /boot (kernels and initrds live there).";
    };
    bootMode = lib.mkOption {
      type = lib.types.enum [ "auto" "bios+uefi" "uefi" ];
      default = "auto";
      description = ''
        `bios+uefi`: GRUB in the BIOS boot partition of `bootDevice` and at the ESP's removable path.
        `uefi`: only the ESP (GRUB device "nodev"). `auto`: bios+uefi on x86, uefi elsewhere (Hetzner's
        x86 servers boot legacy BIOS, the Arm (CAX) servers UEFI).
      '';
    };
    bootDevice = lib.mkOption {
      type = lib.types.str;
      default = "/dev/sda";
      description = "The disk GRUB is installed to on the server (Hetzner Cloud: /dev/sda), not the build VM's.";
    };
    hostId = lib.mkOption {
      type = lib.types.strMatching "[0-9a-f]{8}";
      default = "da8e1001";
      description = ''
        `networking.hostId`, fixed and identical in the image builder and on the server, so the pool
        (exported at the end of the build) imports at boot without force.
      '';
    };
    growOnBoot = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "On first boot, grow the ZFS partition to the disk's end, move the backup GPT header there and expand the pool.";
    };
  };

  config =
    let
      biosBoot = cfg.bootMode == "bios+uefi" || (cfg.bootMode == "auto" && pkgs.stdenv.hostPlatform.isx86);
    in
    {
      boot.supportedFilesystems = [ "zfs" ];
      boot.zfs.devNodes = "/dev/disk/by-partuuid";
      # The pool is exported by the builder and the hostId is fixed: never import by force.
      boot.zfs.forceImportRoot = false;
      networking.hostId = cfg.hostId;

      fileSystems = lib.mapAttrs' (name: ds: lib.nameValuePair ds.mountpoint {
        device = "${cfg.poolName}/${name}";
        fsType = "zfs";
      }) mountedDatasets // {
        "/boot" = {
          device = "/dev/disk/by-partlabel/ESP";
          fsType = "vfat";
          options = [ "fmask=0077" "dmask=0077" ];
        };
      };

      boot.loader.grub = {
        enable = true;
        devices = [ (if biosBoot then cfg.bootDevice else "nodev") ];
        efiSupport = true;
        efiInstallAsRemovable = true;
      };
      boot.loader.efi.canTouchEfiVariables = false;

      systemd.services.nix-dabei-grow = lib.mkIf cfg.growOnBoot {
        description = "Grow the ZFS partition and pool to the whole disk (nix-dabei)";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        unitConfig.ConditionPathExists = "!/var/lib/nix-dabei/grown";
        # growpart lives in the guest output of cloud-utils (as in nixpkgs' grow-partition module).
        path = [ pkgs.gptfdisk pkgs.cloud-utils.guest pkgs.util-linux pkgs.gawk config.boot.zfs.package ];
        serviceConfig = { Type = "oneshot"; RemainAfterExit = true; };
        script = ''
          set -euo pipefail
          part=$(readlink -f /dev/disk/by-partlabel/zfs)
          disk=/dev/$(lsblk -no PKNAME "$part")
          number=$(cat "/sys/class/block/$(basename "$part")/partition")
          # The image is smaller than the disk: its backup GPT header sits mid-disk. Move it to the end.
          sgdisk --move-second-header "$disk"
          # growpart exits 1 when there is nothing to grow (NOCHANGE).
          growpart "$disk" "$number" || [ $? -eq 1 ]
          udevadm settle || true
          # Expand every vdev of the pool, by the path the pool itself records.
          zpool list -v -H -P ${lib.escapeShellArg cfg.poolName} | awk '$1 ~ /^\// { print $1 }' |
            while read -r vdev; do zpool online -e ${lib.escapeShellArg cfg.poolName} "$vdev"; done
          mkdir -p /var/lib/nix-dabei
          touch /var/lib/nix-dabei/grown
        '';
      };
    };
}
