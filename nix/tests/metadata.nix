# Instance metadata in both network-config layouts Hetzner has served, shaped like a real answer of
# /hetzner/v1/metadata (the YAML, as Nix values). `mac` is the test VM's uplink.
{ mac ? "96:00:01:79:bc:40" }:
{
  current = {
    availability-zone = "nbg1-dc3";
    hostname = "installer-test";
    instance-id = 22976764;
    local-ipv4 = "";
    public-ipv4 = "159.69.206.150";
    region = "eu-central";
    public-keys = [ ];
    network-config = {
      version = 1;
      config = [{
        name = "eth0";
        type = "physical";
        mac_address = mac;
        subnets = [
          { ipv4 = true; type = "dhcp"; }
          {
            address = "2a01:4f8:c0c:7bc5::1/64";
            dns_nameservers = [ "2a01:4ff:ff00::add:2" "2a01:4ff:ff00::add:1" ];
            gateway = "fe80::1";
            ipv6 = true;
            type = "static";
          }
        ];
      }];
    };
  };
  older = {
    hostname = "web-2";
    instance-id = 4711815;
    public-ipv4 = "95.216.170.12";
    region = "eu-central";
    network-config = {
      version = 1;
      config = [
        { name = "eth0"; type = "physical"; mac_address = mac; subnets = [ { ipv4 = true; type = "dhcp"; } ]; }
        {
          name = "eth0:0";
          type = "physical";
          subnets = [{
            address = "2a01:4f9:c010:8a3c::1/64";
            dns_nameservers = [ "2a01:4ff:ff00::add:1" ];
            ipv6 = true;
            routes = [ { gateway = "fe80::1"; netmask = "0"; network = "::"; } ];
            type = "static";
          }];
        }
      ];
    };
  };
}
