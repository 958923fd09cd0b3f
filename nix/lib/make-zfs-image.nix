# Builds the raw nix-dabei disk image of a NixOS configuration in a VM (nixpkgs' vmTools), after the model
# of nixpkgs' nixos/lib/make-single-disk-zfs-image.nix, with the nix-dabei layout:
#
#   1 bios-boot  1 MiB   EF02  GRUB core image for legacy BIOS boot
#   2 ESP        espSize EF00  vfat, /boot (kernels, initrds, GRUB for UEFI at the removable path)
#   3 dabei-seed 1 MiB   8300  the per-host seed, written by the installer after the image
#   4 zfs        rest    BF00  the pool; last, so it can grow on first boot
#
# The pool is exported at the end, so the server's first import needs no force whatever host id the build
# VM had; the server then imports it under the image's fixed networking.hostId (../lib/image-layout.nix).
# Result: $out/nixos.img (raw, what dd needs) and $out/nix-support/image-info.json.
{ pkgs, lib, config }:
let
  cfg = config.nix-dabei;
  pool = cfg.poolName;
  esc = lib.escapeShellArg;
  props = flag: attrs: lib.concatStringsSep " " (lib.mapAttrsToList (k: v: "${flag} ${esc "${k}=${v}"}") attrs);

  # Parents before children: sort by the number of path components.
  depth = name: lib.length (lib.splitString "/" name);
  datasetNames = lib.sort (a: b: depth a < depth b || (depth a == depth b && a < b)) (lib.attrNames cfg.datasets);
  createDatasets = lib.concatMapStringsSep "\n" (name:
    let ds = cfg.datasets.${name};
    in
    if ds.mountpoint == null
    then "zfs create -o canmount=off -o mountpoint=none ${props "-o" ds.properties} ${esc "${pool}/${name}"}"
    else "zfs create -o mountpoint=legacy ${props "-o" ds.properties} ${esc "${pool}/${name}"}"
  ) datasetNames;

  mounted = lib.filter (name: cfg.datasets.${name}.mountpoint != null) datasetNames;
  byMountDepth = lib.sort (a: b: lib.stringLength cfg.datasets.${a}.mountpoint < lib.stringLength cfg.datasets.${b}.mountpoint) mounted;
  mountDatasets = lib.concatMapStringsSep "\n" (name: ''
    mkdir -p /mnt${esc cfg.datasets.${name}.mountpoint}
    mount -t zfs ${esc "${pool}/${name}"} /mnt${esc cfg.datasets.${name}.mountpoint}
  '') byMountDepth;
  unmountDatasets = lib.concatMapStringsSep "\n" (name: "umount /mnt${esc cfg.datasets.${name}.mountpoint}")
    (lib.reverseList byMountDepth);

  closureInfo = pkgs.closureInfo { rootPaths = [ config.system.build.toplevel ]; };
  modulesTree = pkgs.aggregateModules [ config.boot.kernelPackages.kernel config.boot.kernelPackages.${config.boot.zfs.package.kernelModuleAttribute} ];
  tools = lib.makeBinPath [
    config.system.build.nixos-install
    # The package: config.system.build.nixos-enter warns since 25.05 and is being removed
    # (nixos/modules/installer/tools/tools.nix).
    pkgs.nixos-enter
    config.boot.zfs.package
    pkgs.dosfstools
    pkgs.gptfdisk
    pkgs.util-linux
    pkgs.coreutils
    pkgs.nix
  ];
in
# Overriding rootModules replaces vmTools' default list, so it is repeated here: vmTools mounts the store
# with virtiofs since nixos-25.05 (older releases: 9p), plus the virtio devices, zfs and vfat.
(pkgs.vmTools.override {
  rootModules = [
    "virtiofs" "9p" "9pnet_virtio"
    "virtio_pci" "virtio_mmio" "virtio_blk" "virtio_balloon" "virtio_rng"
    "zfs" "vfat" "nls_cp437" "nls_iso8859-1"
  ] ++ lib.optional pkgs.stdenv.hostPlatform.isx86 "rtc_cmos";
  kernel = modulesTree;
}).runInLinuxVM (pkgs.runCommand "nix-dabei-image-${pkgs.stdenv.hostPlatform.system}" {
  memSize = 2048;
  # Not `diskImage`: vmTools attaches a variable of that name itself (without format=raw), which would
  # open the same file twice. The nixpkgs ZFS image builders use rootDiskImage for the same reason.
  QEMU_OPTS = "-drive file=$rootDiskImage,if=virtio,cache=unsafe,werror=report,format=raw";
  preVM = ''
    mkdir -p $out
    rootDiskImage=nixos.img
    ${pkgs.qemu-utils}/bin/qemu-img create -f raw $rootDiskImage ${toString cfg.imageSizeMiB}M
  '';
  postVM = ''
    mv $rootDiskImage $out/nixos.img
    mkdir -p $out/nix-support
    cat > $out/nix-support/image-info.json <<INFO
    {"file": "nixos.img", "format": "raw", "system": "${pkgs.stdenv.hostPlatform.system}",
     "pool": "${pool}", "hostId": "${cfg.hostId}", "bootMode": "${cfg.bootMode}", "espSizeMiB": ${toString cfg.espSizeMiB},
     "toplevel": "${config.system.build.toplevel}", "sizeMiB": ${toString cfg.imageSizeMiB}}
    INFO
  '';
} ''
  set -euxo pipefail
  export PATH=${tools}:$PATH

  # The configuration names the server's disk (nix-dabei.bootDevice, /dev/sda on Hetzner); in this VM the
  # disk is /dev/vda. GRUB installs its BIOS core image through this alias, and nothing else records it.
  ln -sf /dev/vda ${esc cfg.bootDevice}

  sgdisk --clear \
    --new=1:2048:+1M --typecode=1:EF02 --change-name=1:bios-boot \
    --new=2:0:+${toString cfg.espSizeMiB}M --typecode=2:EF00 --change-name=2:ESP \
    --new=3:0:+1M --typecode=3:8300 --change-name=3:dabei-seed \
    --new=4:0:0 --typecode=4:BF00 --change-name=4:zfs \
    /dev/vda
  sgdisk --print /dev/vda
  mkdir -p /dev/disk/by-partlabel
  ln -sf /dev/vda2 /dev/disk/by-partlabel/ESP

  zpool create -f -R /mnt ${props "-o" cfg.poolProperties} ${props "-O" cfg.datasetProperties} ${esc pool} /dev/vda4
  ${createDatasets}
  ${lib.optionalString (cfg.blankSnapshot != null) "zfs snapshot ${esc "${pool}/${cfg.blankSnapshot}"}"}
  ${mountDatasets}

  mkfs.vfat -F 32 -n ESP /dev/vda2
  mkdir -p /mnt/boot
  mount /dev/vda2 /mnt/boot

  export NIX_STATE_DIR=$TMPDIR/state
  nix-store --load-db < ${closureInfo}/registration
  nixos-install --root /mnt --system ${config.system.build.toplevel} \
    --no-root-passwd --no-channel-copy --substituters ""

  umount /mnt/boot
  ${unmountDatasets}
  zpool export ${esc pool}
'')
