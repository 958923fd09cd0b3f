# `nix flake check`: the pure instance-data functions on both metadata layouts (evaluated, then a stamp).
{ pkgs }:
let
  lib = import ../lib/instance-data.nix;
  meta = import ./metadata.nix { };
  expect = name: actual: wanted:
    if actual == wanted then true
    else throw "instance-data check '${name}': got ${builtins.toJSON actual}, wanted ${builtins.toJSON wanted}";
  current = lib.fromAttrs meta.current;
  older = lib.fromAttrs meta.older;
  results = [
    (expect "current hostname" current.hostname "installer-test")
    (expect "current ipv6" current.ipv6 {
      address = "2a01:4f8:c0c:7bc5::1"; prefixLength = 64; gateway = "fe80::1";
      nameservers = [ "2a01:4ff:ff00::add:2" "2a01:4ff:ff00::add:1" ];
    })
    (expect "current mac" current.macAddress "96:00:01:79:bc:40")
    (expect "older ipv6 address" older.ipv6.address "2a01:4f9:c010:8a3c::1")
    (expect "older gateway from route" older.ipv6.gateway "fe80::1")
    (expect "older mac from eth0" older.macAddress "96:00:01:79:bc:40")
    (expect "networkd" (lib.networkdNetwork older).routes [ { Gateway = "fe80::1"; GatewayOnLink = true; } ])
    (expect "gateway zone dropped" (lib.normalizeIPv6 "gateway" "FE80::1%enp1s0") "fe80::1")
    (expect "fqdn" (lib.splitHostname "web-1.example.com") { hostname = "web-1.example.com"; hostName = "web-1"; domain = "example.com"; })
  ];
in
pkgs.runCommand "nix-dabei-instance-data-check" { } ''
  echo ${toString (builtins.length (builtins.filter (ok: ok) results))} checks passed > $out
''
