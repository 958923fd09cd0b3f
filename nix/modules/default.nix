# Everything: `nixosModules.default` of the flake.
{
  imports = [
    ./hetzner-hardware.nix
    ./instance-data.nix
    ./hetzner-networking.nix
    ./zfs-image.nix
    ./firstboot.nix
    ./image.nix
  ];
}
