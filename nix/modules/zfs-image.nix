# The ZFS layout of the nix-dabei image and what the installed system needs to boot from it:
# GPT with a BIOS boot partition, an ESP (/boot), the 1 MiB `dabei-seed` partition and ZFS for the rest;
# GRUB for legacy BIOS (x86 servers boot this way on Hetzner) and removable-path UEFI (CAX servers).
{ config, lib, pkgs, ... }:
let
  cfg = config.nix-dabei;
  layout = import ../lib/image-layout.nix;
  mountedDatasets = lib.filterAttrs (_: ds: ds.mountpoint != null) cfg.datasets;
  # A fact of the image: declared once, with its value, and refused if a configuration sets it too
  # (a readOnly option with a default accepts no other definition: nixpkgs lib/modules.nix).
  imageFact = type: default: description: lib.mkOption {
    inherit type default;
    readOnly = true;
    description = description + " A fact of the written image (nix/lib/image-layout.nix), read-only.";
  };
  datasetType = lib.types.submodule {
    options = {
      mountpoint = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = "Where the dataset is mounted (mountpoint=legacy, mounted by NixOS); null for a non-mounting parent (canmount=off).";
      };
      properties = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        default = { };
        description = "ZFS properties of this dataset (`zfs create -o`).";
      };
    };
  };
in
{
  options.nix-dabei = {
    poolName = imageFact lib.types.str layout.poolName "Name of the ZFS pool on the image's last partition.";
    poolProperties = imageFact (lib.types.attrsOf lib.types.str) layout.poolProperties "Pool properties (`zpool create -o`).";
    datasetProperties = imageFact (lib.types.attrsOf lib.types.str) layout.rootDatasetProperties
      "Properties of the pool's root dataset (`zpool create -O`); the datasets inherit all but canmount, which ZFS never inherits.";
    datasets = imageFact (lib.types.attrsOf datasetType)
      (builtins.mapAttrs (_: mountpoint: { inherit mountpoint; }) layout.datasets)
      "Datasets by name relative to the pool: parents without a mountpoint are created with canmount=off and mountpoint=none; mounted datasets get mountpoint=legacy and a `fileSystems` entry.";
    blankSnapshot = imageFact (lib.types.nullOr lib.types.str) layout.blankSnapshot
      "Snapshot taken right after the datasets are created (before installing).";
    espSizeMiB = imageFact lib.types.ints.positive layout.espSizeMiB "Size of the ESP, mounted at /boot (kernels and initrds live there).";
    bootMode = imageFact (lib.types.enum [ "bios+uefi" "uefi" ]) (layout.bootModeFor pkgs.stdenv.hostPlatform.isx86) ''
      `bios+uefi`: GRUB in the BIOS boot partition of `bootDevice` and at the ESP's removable path (x86).
      `uefi`: only the ESP, GRUB device "nodev" (Hetzner's Arm (CAX) servers).
    '';
    bootDevice = imageFact lib.types.str layout.bootDevice "The disk GRUB is installed to on the server (Hetzner Cloud: /dev/sda), not the build VM's.";
    hostId = imageFact (lib.types.strMatching "[0-9a-f]{8}") layout.hostId ''
      `networking.hostId` of every host installed from the image. ZFS records the importing host's id in
      the pool; with boot.zfs.forceImportRoot = false the initrd refuses a root pool last imported
      under another id, so this never changes after the install.
    '';
    imageSizeMiB = lib.mkOption {
      type = lib.types.ints.between 2048 262144;
      default = 6144;
      description = "Size of the raw image in MiB; the ZFS partition grows to the whole disk on first boot.";
    };
    growOnBoot = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "On every boot, grow the ZFS partition to the disk's end (first boot, or after a resize), move the backup GPT header there and expand the pool.";
    };
  };

  config =
    let
      biosBoot = cfg.bootMode == "bios+uefi";
    in
    {
      boot.supportedFilesystems = [ "zfs" ];
      boot.zfs.devNodes = "/dev/disk/by-partuuid";
      # The pool is exported by the builder and the hostId is fixed: never import by force.
      boot.zfs.forceImportRoot = false;
      networking.hostId = cfg.hostId;
      # networking.hostId and fileSystems are nixpkgs options a configuration could still force.
      assertions = [
        {
          assertion = config.networking.hostId == cfg.hostId;
          message = "nix-dabei: networking.hostId must stay ${cfg.hostId} (the id the root pool is imported under); it is ${toString config.networking.hostId}.";
        }
        {
          assertion = (config.fileSystems."/".device or null) == "${cfg.poolName}/local/root";
          message = "nix-dabei: fileSystems.\"/\" must stay ${cfg.poolName}/local/root, the image's root dataset.";
        }
      ];

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
        # /boot is the ESP, not on /'s filesystem, so GRUB copies every generation's kernel and initrd
        # there (copyKernels: nixos/modules/system/boot/loader/grub/grub.nix). About 60 MiB each with
        # the ZFS initrd: 5 generations (plus the one being installed) fit the 512 MiB ESP.
        configurationLimit = lib.mkDefault 5;
      };
      boot.loader.efi.canTouchEfiVariables = false;

      # Every boot, not only the first: a resize (Hetzner's change_type with upgrade_disk, pulumi-hcloud's
      # default) makes the disk bigger under an installed system. `nix-dabei grow` does what growpart does
      # (nixpkgs' grow-partition module) and then `zpool online -e`; each step is a no-op when the pool
      # already fills the disk (nix/firstboot/dabei_firstboot/grow.py).
      systemd.services.nix-dabei-grow = lib.mkIf cfg.growOnBoot {
        description = "Grow the ZFS partition and pool to the whole disk (nix-dabei)";
        wantedBy = [ "multi-user.target" ];
        # sgdisk rewrites the GPT the seed reader parses: never at the same time.
        after = [ "local-fs.target" "nix-dabei-seed.service" ];
        path = [ pkgs.gptfdisk pkgs.util-linux config.boot.zfs.package ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ExecStart = "${lib.getExe config.nix-dabei.firstboot.package} grow";
        };
      };
    };
}
