# `system.build.nixDabeiImage`: the raw disk image of this configuration (see ../lib/make-zfs-image.nix).
{ config, lib, pkgs, ... }:
{
  system.build.nixDabeiImage = import ../lib/make-zfs-image.nix { inherit pkgs lib config; };
}
