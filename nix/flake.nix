{
  description = "nix-dabei: NixOS on ZFS for Hetzner Cloud (image, modules, per-host seed, first boot)";

  # The current stable release (see nix/README.md: supported releases).
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs }:
    let
      lib = nixpkgs.lib;
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: lib.genAttrs systems (system: f system nixpkgs.legacyPackages.${system});

      # A NixOS system from the nix-dabei modules plus the given ones.
      mkSystem = system: modules: lib.nixosSystem {
        inherit system;
        modules = [ self.nixosModules.default ] ++ modules;
      };

      # The shared image every server is installed from: no per-host data, the seed supplies it.
      imageSystem = system: mkSystem system [ { system.stateVersion = "26.05"; } ];
    in
    {
      nixosModules = {
        default = ./modules/default.nix;
        hetzner-hardware = ./modules/hetzner-hardware.nix;
        instance-data = ./modules/instance-data.nix;
        hetzner-networking = ./modules/hetzner-networking.nix;
        zfs-image = ./modules/zfs-image.nix;
        firstboot = ./modules/firstboot.nix;
        image = ./modules/image.nix;
      };

      lib = {
        # Pure functions over the instance metadata (builtins only): fromFile, fromJSON, fromAttrs, ...
        instanceData = import ./lib/instance-data.nix;
        # The raw image of any configuration that imports nixosModules.default.
        mkImage = nixosConfiguration: nixosConfiguration.config.system.build.nixDabeiImage;
        inherit mkSystem;
      };

      packages = forAllSystems (system: pkgs: {
        nix-dabei = pkgs.callPackage ./firstboot/package.nix { };
        image = (imageSystem system).config.system.build.nixDabeiImage;
        default = self.packages.${system}.image;
      });

      nixosConfigurations = {
        example = mkSystem "x86_64-linux" [ ./example/configuration.nix ];
        example-aarch64 = mkSystem "aarch64-linux" [ ./example/configuration.nix ];
      };

      devShells = forAllSystems (system: pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.pulumi-bin
            pkgs.hcloud
            pkgs.zstd
            pkgs.gptfdisk
            pkgs.openssh
            (pkgs.python3.withPackages (ps: [
              ps.pyyaml
              ps.aiohttp
              ps.asyncssh
              ps.hcloud
              ps.pytest
              ps.pytest-asyncio
              ps.jsonschema
            ]))
          ];
          shellHook = ''
            echo "pulumi-hcloud and the pinned Python packages: pip install -e '.[test]' in a venv (see requirements.txt)"
          '';
        };
      });

      checks = forAllSystems (system: pkgs: {
        firstboot = import ./tests/firstboot-vm.nix { inherit pkgs self; };
        instance-data = import ./tests/instance-data.nix { inherit pkgs; };
      });

      formatter = forAllSystems (system: pkgs: pkgs.nixfmt-rfc-style);
    };
}
