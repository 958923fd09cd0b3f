# Hetzner Cloud networking with systemd-networkd: IPv4 by DHCP, static IPv6 with gateway fe80::1.
# Interfaces are matched by permanent MAC address (from the instance data) or by driver, never by name.
{ config, lib, ... }:
let
  cfg = config.nix-dabei.networking;
  instance = config.nix-dabei.instance;
  instanceLib = import ../lib/instance-data.nix;
in
{
  options.nix-dabei.networking.enable = lib.mkOption {
    type = lib.types.bool;
    default = true;
    description = ''
      Configure the uplink with systemd-networkd: a catch-all DHCPv4 network for Hetzner's virtio NICs (so
      the shared image reaches the metadata service on any server) and, when the instance data is known at
      evaluation time, the static IPv6 network matched by the uplink's permanent MAC address. The
      first-boot program writes the same configuration to /run/systemd/network at runtime.
    '';
  };

  config = lib.mkIf cfg.enable {
    networking.useNetworkd = true;
    networking.useDHCP = false;
    systemd.network.enable = true;
    systemd.network.networks = {
      "10-nix-dabei-uplink" = lib.mkIf (instance != null) (instanceLib.networkdNetwork instance);
      # Sorts after the uplink network (networkd applies the first matching file). Hetzner Cloud's NICs
      # (public and private networks) are virtio-net: matching the driver leaves out the veth, tap,
      # bridge and VLAN devices of containers and VMs, which Type=ether alone would also catch.
      "99-nix-dabei-ether" = {
        matchConfig = {
          Type = "ether";
          Driver = "virtio_net";
        };
        networkConfig.DHCP = "ipv4";
      };
    };
    # Hetzner's recursive resolvers, used until DHCP provides others.
    networking.nameservers = lib.mkDefault [ "185.12.64.1" "185.12.64.2" ];
  };
}
