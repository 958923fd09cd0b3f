# An example fleet for nix-dabei: two x86_64 hosts (CX, BIOS) and one arm64 host (CAX, UEFI), the images
# every server is installed from, and `Pulumi.example.yaml` with the matching stack config.
#
# Copy this directory into your own repository, point `nix-dabei.url` at this project's `nix/` flake, and
# name each host in `hosts` of the stack config exactly as here (the attribute is the server's name).
{
  description = "nix-dabei example fleet";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";
  # This project's flake (its nix/ directory): the NixOS modules, the image builder, the first-boot program.
  inputs.nix-dabei.url = "github:OWNER/nix-dabei-pulumi?dir=nix";
  inputs.nix-dabei.inputs.nixpkgs.follows = "nixpkgs";

  outputs = { self, nixpkgs, nix-dabei }:
    let
      # A host: nix-dabei's modules (ZFS layout, Hetzner networking, first boot) plus its own.
      host = system: modules: nix-dabei.lib.mkSystem system ([ ./hosts/common.nix ] ++ modules);
    in
    {
      nixosConfigurations = {
        web-1 = host "x86_64-linux" [ ./hosts/web.nix ];
        web-2 = host "x86_64-linux" [ ./hosts/web.nix ];
        arm-1 = host "aarch64-linux" [ ./hosts/worker.nix ];
      };

      # The shared images, one per architecture (no per-host data: the seed brings it). `image.attr` in the
      # stack config, `packages.{system}.image`, picks each host's by its server type.
      packages = nixpkgs.lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (system: {
        image = nix-dabei.packages.${system}.image;
      });
    };
}
