# Hostname and network facts from Hetzner's instance metadata, as plain data for the other modules.
# The data comes from `nix-dabei.instanceData` (an attribute set, e.g. builtins.fromJSON of a file kept in
# the user's flake) or `nix-dabei.instanceDataFile`; both accept the raw metadata (either network-config
# layout) or the reduced instance-data.json the first-boot program writes.
{ config, lib, ... }:
let
  cfg = config.nix-dabei;
  instanceLib = import ../lib/instance-data.nix;
  source =
    if cfg.instanceData != null then instanceLib.fromAttrs cfg.instanceData
    else if cfg.instanceDataFile != null then instanceLib.fromFile cfg.instanceDataFile
    else null;
in
{
  options.nix-dabei = {
    instanceData = lib.mkOption {
      type = lib.types.nullOr (lib.types.attrsOf lib.types.anything);
      default = null;
      example = lib.literalExpression "builtins.fromJSON (builtins.readFile ./hosts/web-1.json)";
      description = ''
        Instance metadata of this host (Hetzner's metadata document, or the instance-data.json the
        first-boot program writes). When set, the hostname and the static uplink configuration are
        declared at evaluation time. When null, the first-boot program configures them at runtime.
      '';
    };
    instanceDataFile = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = lib.literalExpression "./hosts/web-1.json";
      description = "Like `nix-dabei.instanceData`, read from a JSON file (a path inside your flake).";
    };
    instance = lib.mkOption {
      type = lib.types.nullOr (lib.types.attrsOf lib.types.anything);
      readOnly = true;
      description = ''
        The instance data, normalised by `nix/lib/instance-data.nix`:
        `{ hostname, hostName, domain, macAddress, ipv4Dhcp, ipv6 = { address, prefixLength, gateway, nameservers } or null, ... }`,
        or null when no instance data is given.
      '';
    };
  };

  config = {
    nix-dabei.instance = source;
    # networking.hostName is one DNS label (nixos/modules/tasks/network-interfaces.nix): a fully qualified
    # server name gives its first label, and the rest becomes networking.domain.
    networking.hostName = lib.mkIf (source != null) (lib.mkDefault source.hostName);
    networking.domain = lib.mkIf (source != null && source.domain != null) (lib.mkDefault source.domain);
  };
}
