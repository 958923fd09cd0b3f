# Pure functions (builtins only, no nixpkgs) from Hetzner's instance metadata to the facts a host needs:
# hostname (split into hostName and domain), IPv4 by DHCP, the static IPv6 address/prefix/gateway/
# nameservers and the uplink's MAC address.
#
# Accepts both network-config layouts Hetzner has served:
#   - IPv6 as a second subnet of eth0 (the current layout, see ../shared/fixtures/hetzner-metadata.json);
#   - IPv6 as a separate "eth0:0" entry whose gateway is given directly or as a default route.
# and the reduced instance data the first-boot program writes (/var/lib/nix-dabei/instance-data.json).
#
# Every address and name is normalized by the same rules as the first-boot program
# (nix/firstboot/dabei_firstboot/metadata.py; tests/nix compares the two): IPv6 in RFC 5952 form with
# any zone ("fe80::1%enp1s0") dropped, since networkd does not parse zones and the route is bound to the
# MAC-matched link anyway; prefix lengths from "/64", 64, "64" or a netmask; MACs in lower case; a
# hostname with dots becomes hostName (one DNS label, as NixOS requires) plus domain. A value that
# cannot be normalized, or an answer that cannot configure the server, is refused with an error naming
# the key.
#
#   nix-instantiate --eval --strict --json -E \
#     '(import ./nix/lib/instance-data.nix).fromFile ../shared/fixtures/hetzner-metadata.json'
let
  inherit (builtins)
    all any concatLists concatStringsSep elemAt filter foldl' fromJSON genList head isAttrs isInt isList
    isString length listToAttrs match replaceStrings split stringLength substring tail toJSON;

  defaultGateway6 = "fe80::1";

  fail = key: problem: throw "instance-data: metadata ${key}: ${problem}";
  show = v: if isString v then "'${v}'" else if v == null then "None" else toJSON v;

  first = pred: list:
    let found = filter pred list;
    in if found == [ ] then null else head found;

  attrOr = name: default: set: if isAttrs set && set ? ${name} then set.${name} else default;
  absent = v: v == null || v == "";
  asText = v: if isString v then v else if isInt v then toString v else "<not text>";

  chars = s: genList (i: substring i 1 s) (stringLength s);
  lower = replaceStrings (chars "ABCDEFGHIJKLMNOPQRSTUVWXYZ") (chars "abcdefghijklmnopqrstuvwxyz");
  trim = s:
    let m = match "[[:space:]]*([^[:space:]](.*[^[:space:]])?)?[[:space:]]*" s;
    in if m == null || head m == null then "" else head m;
  splitOn = sep: s: filter isString (split sep s);

  hexDigits = chars "0123456789abcdef";
  hexValue = listToAttrs (genList (i: { name = elemAt hexDigits i; value = i; }) 16);
  parseHex = s: foldl' (acc: c: acc * 16 + hexValue.${c}) 0 (chars s);
  toHex = n: if n < 16 then elemAt hexDigits n else toHex (n / 16) + elemAt hexDigits (n - 16 * (n / 16));
  pow2 = k: foldl' (acc: _: acc * 2) 1 (genList (x: x) k);
  # A netmask group with n leading one bits -> n.
  maskOnes = listToAttrs (genList (n: { name = toString (65536 - pow2 (16 - n)); value = n; }) 17);

  ipv4 = key: text:
    let octets = match "(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})\\.(0|[1-9][0-9]{0,2})" text;
    in
    if octets == null || any (o: fromJSON o > 255) octets then fail key "${show text} is not an IPv4 address"
    else text;

  # The eight 16-bit groups of an IPv6 address (RFC 4291 text forms, embedded IPv4 included).
  hextets = key: text:
    let
      bad = fail key "${show text} is not an IPv6 address";
      groups = part:
        if part == "" then [ ]
        else
          let items = splitOn ":" part; count = length items;
          in concatLists (genList (i:
            let item = elemAt items i; in
            if match ".*\\..*" item != null && i == count - 1 then
              let o = map fromJSON (splitOn "\\." (ipv4 key item));
              in [ (elemAt o 0 * 256 + elemAt o 1) (elemAt o 2 * 256 + elemAt o 3) ]
            else if match "[0-9a-f]{1,4}" item != null then [ (parseHex item) ]
            else bad) count);
      halves = splitOn "::" text;
    in
    if length halves > 2 then bad
    else if length halves == 1 then
      let all8 = groups (head halves); in if length all8 != 8 then bad else all8
    else
      let before = groups (elemAt halves 0); after = groups (elemAt halves 1);
      in
      if length before + length after > 7 then bad
      else before ++ genList (_: 0) (8 - length before - length after) ++ after;

  # RFC 5952: lower case, no leading zeros, the longest run (>= 2, the first of equals) of zeros as "::".
  renderIPv6 = groups:
    let
      run = foldl' (st: i:
        let value = if i < 8 then elemAt groups i else 1; in
        if value == 0 && st.start == null then st // { start = i; }
        else if value != 0 && st.start != null then
          (if i - st.start > st.length then st // { best = st.start; length = i - st.start; } else st) // { start = null; }
        else st) { start = null; best = -1; length = 0; } (genList (i: i) 9);
      text = map toHex groups;
      slice = from: to: genList (i: elemAt text (from + i)) (to - from);
    in
    if run.length < 2 then concatStringsSep ":" text
    else concatStringsSep ":" (slice 0 run.best) + "::" + concatStringsSep ":" (slice (run.best + run.length) 8);

  stripZone = text: head (split "%" text);

  normalizeIPv6 = key: value:
    if !(isString value) || trim value == "" then fail key "${show value} is not an IPv6 address"
    else renderIPv6 (hextets key (stripZone (lower (trim value))));

  normalizeIP = key: value:
    if isString value && match ".*:.*" value == null then ipv4 key (trim value) else normalizeIPv6 key value;

  prefixLength = key: value:
    let
      digits = if isString value then match "/?0*([0-9]+)" (trim value) else null;
      maskLength =
        let
          step = st: group:
            let ones = maskOnes.${toString group} or null; in
            if st.bad then st
            else if st.done then (if group == 0 then st else st // { bad = true; })
            else if ones == null then st // { bad = true; }
            else st // { n = st.n + ones; done = ones < 16; };
          result = foldl' step { n = 0; done = false; bad = false; } (hextets key (stripZone (lower (trim value))));
        in
        if result.bad then fail key "netmask ${show value} is not contiguous" else result.n;
      len =
        if isInt value then value
        else if digits != null then fromJSON (head digits)
        else if isString value && match ".*:.*" value != null then maskLength
        else fail key "${show value} is not a prefix length";
    in
    if len < 1 || len > 128 then fail key "prefix length ${toString len} is not between 1 and 128" else len;

  normalizeMac = key: value:
    let text = if isString value then replaceStrings [ "-" ] [ ":" ] (lower (trim value)) else "";
    in if match "[0-9a-f]{2}(:[0-9a-f]{2}){5}" text == null then fail key "${show value} is not a MAC address" else text;

  # NixOS' networking.hostName is one DNS label (nixos/modules/tasks/network-interfaces.nix): a fully
  # qualified server name becomes hostName plus networking.domain.
  splitHostname = value:
    let
      trimmed = if isString value then trim value else "";
      name = if match ".*\\." trimmed != null then substring 0 (stringLength trimmed - 1) trimmed else trimmed;
      labels = splitOn "\\." name;
      goodLabel = label: match "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?" label != null;
    in
    if trimmed == "" then fail "'hostname'" "missing or empty"
    else if stringLength name > 253 || !(all goodLabel labels) then
      fail "'hostname'" "${show value} is not a valid host name (RFC 1123 labels)"
    else {
      hostname = name;
      hostName = head labels;
      domain = if length labels == 1 then null else concatStringsSep "." (tail labels);
    };

  # "eth0:0" -> "eth0"
  baseName = name: head (split ":" name);

  isIPv6Subnet = subnet:
    (attrOr "ipv6" false subnet) == true
    || builtins.elem (attrOr "type" "" subnet) [ "static6" "dhcp6" ]
    || ((attrOr "type" "" subnet) == "static" && match ".*:.*" (asText (attrOr "address" "" subnet)) != null);
  isStaticIPv6 = subnet: isAttrs subnet && isIPv6Subnet subnet && (attrOr "type" "" subnet) != "dhcp6";
  isDhcp4 = subnet: isAttrs subnet && !(isIPv6Subnet subnet) && builtins.elem (attrOr "type" "" subnet) [ "dhcp" "dhcp4" ];

  isDefaultRoute6 = route:
    builtins.elem (trim (asText (attrOr "network" (attrOr "destination" "" route) route))) [ "::" "::/0" "default" ]
    && builtins.elem (trim (asText (attrOr "netmask" (attrOr "prefix" "0" route) route))) [ "0" "::" "" ];

  ipv6FromSubnet = where: subnet:
    let
      raw = attrOr "address" null subnet;
      parts = match "([^/]*)(/(.*))?" (trim raw);
      suffix = if parts == null then null else elemAt parts 2;
      mask = attrOr "netmask" (attrOr "prefix" null subnet) subnet;
      routes = attrOr "routes" [ ] subnet;
      defaults = filter (r: isAttrs r && isDefaultRoute6 r) (if isList routes then routes else [ ]);
      ownGateway = attrOr "gateway" null subnet;
      gateway = if !(absent ownGateway) then ownGateway else if defaults != [ ] then attrOr "gateway" null (head defaults) else null;
      gatewayKey = if !(absent ownGateway) then "${where}.gateway" else "${where}.routes[default].gateway";
      nameservers = let n = attrOr "dns_nameservers" null subnet; in if absent n then [ ] else n;
    in
    if !(isString raw) || trim raw == "" then fail "${where}.address" "${show raw} is not an IPv6 address"
    else if !(isList nameservers) then fail "${where}.dns_nameservers" "must be a list of addresses, got ${show nameservers}"
    else {
      address = normalizeIPv6 "${where}.address" (head parts);
      prefixLength =
        if !(absent suffix) then prefixLength "${where}.address" suffix
        else if !(absent mask) then prefixLength "${where}.netmask" mask
        else 64;
      gateway = if absent gateway then defaultGateway6 else normalizeIPv6 gatewayKey gateway;
      nameservers = genList (i: normalizeIP "${where}.dns_nameservers[${toString i}]" (elemAt nameservers i)) (length nameservers);
    };

  # Raw metadata (the service's YAML, parsed) -> instance data.
  fromMetadata = meta:
    let
      names = splitHostname (attrOr "hostname" null meta);
      network = attrOr "network-config" null meta;
      entries = attrOr "config" null network;
      physical = filter (e: isAttrs e && (attrOr "type" "physical" e) == "physical") entries;
      withSubnet = pred: first (e: isList (attrOr "subnets" null e) && any pred e.subnets) physical;
      v6Entry = withSubnet isStaticIPv6;
      v4Entry = withSubnet isDhcp4;
      uplink = if v6Entry != null then v6Entry else v4Entry;
      name = asText (attrOr "name" "" uplink);
      ownMac = attrOr "mac_address" null uplink;
      # The older layout's "eth0:0" alias carries no MAC address: it is eth0's.
      sibling = first (e: baseName (asText (attrOr "name" "" e)) == baseName name && !(absent (attrOr "mac_address" null e))) physical;
      mac = if !(absent ownMac) then ownMac else if sibling != null then sibling.mac_address else null;
      publicIPv4 = attrOr "public-ipv4" null meta;
    in
    builtins.seq names (
    if !(isAttrs network) then fail "'network-config'" "missing: the answer does not describe the server's network"
    else if (attrOr "version" 1 network) != 1 then fail "'network-config.version'" "${show network.version} is not supported (version 1)"
    else if !(isList entries) || entries == [ ] then
      fail "'network-config.config'" "lists no network interface: the server has no public IPv4 or IPv6 network"
    else if uplink == null then
      fail "'network-config.config'" "has no public IPv4 (dhcp) or IPv6 (static) subnet on a physical interface"
    else if absent mac then fail "'network-config' entry '${name}'" "has no mac_address"
    else names // {
      macAddress = normalizeMac "'network-config' entry '${name}' mac_address" mac;
      instanceId = attrOr "instance-id" null meta;
      region = attrOr "region" null meta;
      publicIPv4 = if absent publicIPv4 then null else ipv4 "'public-ipv4'" (if isString publicIPv4 then trim publicIPv4 else toString publicIPv4);
      ipv4Dhcp = v4Entry != null;
      ipv6 =
        if v6Entry == null then null
        else ipv6FromSubnet "'network-config' entry '${asText (attrOr "name" "" v6Entry)}' subnet" (first isStaticIPv6 v6Entry.subnets);
    });

  # The first-boot program's instance-data.json -> the same shape as fromMetadata (normalized again, so
  # a file written by an older version gives the same facts).
  fromReduced = data:
    let
      where = "instance data";
      v6 = attrOr "ipv6" null data;
    in
    splitHostname (attrOr "hostname" null data) // {
      macAddress = normalizeMac "${where} mac_address" data.mac_address;
      instanceId = attrOr "instance_id" null data;
      region = attrOr "region" null data;
      publicIPv4 = let ip = attrOr "public_ipv4" null data; in if absent ip then null else ipv4 "${where} public_ipv4" ip;
      ipv4Dhcp = attrOr "ipv4_dhcp" true data;
      ipv6 =
        if v6 == null then null
        else {
          address = normalizeIPv6 "${where} ipv6.address" v6.address;
          prefixLength = prefixLength "${where} ipv6.prefix_length" v6.prefix_length;
          gateway = normalizeIPv6 "${where} ipv6.gateway" v6.gateway;
          nameservers = map (normalizeIP "${where} ipv6.nameservers") (attrOr "nameservers" [ ] v6);
        };
    };

  fromAttrs = doc:
    if isAttrs doc && doc ? mac_address then fromReduced doc
    else if isAttrs doc then fromMetadata doc
    else throw "instance-data: neither Hetzner metadata nor nix-dabei instance data (not an attribute set)";

  fromJSON' = text: fromAttrs (fromJSON text);

  fromFile = path: fromJSON' (builtins.readFile path);

  # A value for systemd.network.networks.<name> (systemd-networkd, no interface names). The permanent
  # MAC matches the NIC itself, not bridges or VLANs that inherit its address (systemd.network(5)).
  networkdNetwork = data: {
    matchConfig.PermanentMACAddress = data.macAddress;
    networkConfig = {
      DHCP = if data.ipv4Dhcp then "ipv4" else "no";
    } // (if data.ipv6 == null then { } else { IPv6AcceptRA = false; });
    address = if data.ipv6 == null then [ ] else [ "${data.ipv6.address}/${toString data.ipv6.prefixLength}" ];
    dns = if data.ipv6 == null then [ ] else data.ipv6.nameservers;
    routes = if data.ipv6 == null then [ ] else [ { Gateway = data.ipv6.gateway; GatewayOnLink = true; } ];
  };
in
{
  inherit fromMetadata fromReduced fromAttrs fromFile networkdNetwork defaultGateway6 splitHostname
    normalizeIPv6 normalizeIP normalizeMac prefixLength;
  fromJSON = fromJSON';
}
