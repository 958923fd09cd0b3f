# Pure functions (builtins only, no nixpkgs) from Hetzner's instance metadata to the facts a host needs:
# hostname, IPv4 by DHCP, the static IPv6 address/prefix/gateway/nameservers and the uplink's MAC address.
#
# Accepts both network-config layouts Hetzner has served:
#   - IPv6 as a second subnet of eth0 (the current layout, see ../shared/fixtures/hetzner-metadata.json);
#   - IPv6 as a separate "eth0:0" entry whose gateway is given directly or as a default route.
# and the reduced instance data the first-boot program writes (/var/lib/nix-dabei/instance-data.json).
#
#   nix-instantiate --eval --strict --json -E \
#     '(import ./nix/lib/instance-data.nix).fromFile ../shared/fixtures/hetzner-metadata.json'
let
  defaultGateway6 = "fe80::1";

  first = pred: list:
    let found = builtins.filter pred list;
    in if found == [ ] then null else builtins.head found;

  attrOr = name: default: set: if builtins.isAttrs set && set ? ${name} then set.${name} else default;

  # "eth0:0" -> "eth0"
  baseName = name: builtins.head (builtins.split ":" name);

  isIPv6Subnet = subnet:
    (attrOr "ipv6" false subnet) == true
    || (attrOr "type" "" subnet) == "static6"
    || ((attrOr "type" "" subnet) == "static" && builtins.match ".*:.*" (toString (attrOr "address" "" subnet)) != null);

  isDhcp4Subnet = subnet:
    !(isIPv6Subnet subnet) && builtins.elem (attrOr "type" "" subnet) [ "dhcp" "dhcp4" ];

  isDefaultRoute6 = route:
    builtins.elem (toString (attrOr "network" (attrOr "destination" "" route) route)) [ "::" "::/0" "default" ]
    && builtins.elem (toString (attrOr "netmask" (attrOr "prefix" "0" route) route)) [ "0" "::" "" ];

  # "2a01:4f8::1/64" or address + netmask/prefix -> { address; prefixLength; }
  splitAddress = subnet:
    let
      raw = toString subnet.address;
      parts = builtins.match "([0-9A-Fa-f:.]+)/([0-9]+)" raw;
      mask = attrOr "netmask" (attrOr "prefix" null subnet) subnet;
    in
    if parts != null then { address = builtins.elemAt parts 0; prefixLength = builtins.fromJSON (builtins.elemAt parts 1); }
    else if builtins.match "[0-9A-Fa-f:.]+" raw == null then throw "instance-data: IPv6 address '${raw}' is not valid"
    else if mask == null then { address = raw; prefixLength = 64; }
    else if builtins.match "[0-9]+" (toString mask) != null then { address = raw; prefixLength = builtins.fromJSON (toString mask); }
    else throw "instance-data: IPv6 netmask '${toString mask}' of ${raw} is not a prefix length";

  ipv6FromSubnet = subnet:
    let
      defaults = builtins.filter isDefaultRoute6 (attrOr "routes" [ ] subnet);
      gateway =
        if subnet ? gateway && subnet.gateway != null then subnet.gateway
        else if defaults != [ ] then attrOr "gateway" defaultGateway6 (builtins.head defaults)
        else defaultGateway6;
    in
    splitAddress subnet // {
      inherit gateway;
      nameservers = attrOr "dns_nameservers" [ ] subnet;
    };

  # Raw metadata (the service's YAML, parsed) -> instance data.
  fromMetadata = meta:
    let
      entries = attrOr "config" (throw "instance-data: metadata has no network-config.config") (attrOr "network-config" { } meta);
      physical = builtins.filter (e: builtins.isAttrs e && (attrOr "type" "physical" e) == "physical") entries;
      macOf = entry:
        let
          own = attrOr "mac_address" null entry;
          base = first (e: (attrOr "name" "" e) == baseName (attrOr "name" "" entry) && (attrOr "mac_address" null e) != null) physical;
        in
        if own != null then own else if base != null then base.mac_address else null;
      withSubnets = pred: first (e: builtins.any pred (attrOr "subnets" [ ] e)) physical;
      v6Entry = withSubnets (s: isIPv6Subnet s && (attrOr "type" "" s) != "dhcp6");
      v4Entry = withSubnets isDhcp4Subnet;
      uplink = if v6Entry != null then v6Entry else if v4Entry != null then v4Entry else first (e: macOf e != null) physical;
      mac = if uplink == null then null else macOf uplink;
      hostname = attrOr "hostname" null meta;
    in
    if !(builtins.isString hostname) || hostname == "" then throw "instance-data: metadata has no hostname"
    else if mac == null then throw "instance-data: metadata has no mac_address for the public interface"
    else {
      inherit hostname;
      macAddress = mac;
      instanceId = attrOr "instance-id" null meta;
      region = attrOr "region" null meta;
      publicIPv4 = let ip = attrOr "public-ipv4" "" meta; in if ip == "" then null else ip;
      ipv4Dhcp = v4Entry != null;
      ipv6 =
        if v6Entry == null then null
        else ipv6FromSubnet (first (s: isIPv6Subnet s && (attrOr "type" "" s) != "dhcp6") v6Entry.subnets);
    };

  # The first-boot program's instance-data.json -> the same shape as fromMetadata.
  fromReduced = data: {
    inherit (data) hostname;
    macAddress = data.mac_address;
    instanceId = attrOr "instance_id" null data;
    region = attrOr "region" null data;
    publicIPv4 = attrOr "public_ipv4" null data;
    ipv4Dhcp = attrOr "ipv4_dhcp" true data;
    ipv6 =
      if (attrOr "ipv6" null data) == null then null
      else {
        inherit (data.ipv6) address gateway;
        prefixLength = data.ipv6.prefix_length;
        nameservers = attrOr "nameservers" [ ] data.ipv6;
      };
  };

  fromAttrs = doc:
    if doc ? "network-config" then fromMetadata doc
    else if doc ? mac_address then fromReduced doc
    else throw "instance-data: neither Hetzner metadata (network-config) nor nix-dabei instance data (mac_address)";

  fromJSON = text: fromAttrs (builtins.fromJSON text);

  fromFile = path: fromJSON (builtins.readFile path);

  # A value for systemd.network.networks.<name> (systemd-networkd, matched by MAC, no interface names).
  networkdNetwork = data: {
    matchConfig.MACAddress = data.macAddress;
    networkConfig = {
      DHCP = if data.ipv4Dhcp then "ipv4" else "no";
    } // (if data.ipv6 == null then { } else { IPv6AcceptRA = false; });
    address = if data.ipv6 == null then [ ] else [ "${data.ipv6.address}/${toString data.ipv6.prefixLength}" ];
    dns = if data.ipv6 == null then [ ] else data.ipv6.nameservers;
    routes = if data.ipv6 == null then [ ] else [ { Gateway = data.ipv6.gateway; GatewayOnLink = true; } ];
  };
in
{
  inherit fromMetadata fromReduced fromAttrs fromJSON fromFile networkdNetwork defaultGateway6;
}
