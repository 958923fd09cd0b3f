# Evaluates one nix-dabei NixOS module as the function it is, without nixpkgs: stand-ins for the parts of
# nixpkgs' `lib` the modules call (mkOption, mkIf, mkDefault and `types` kept as inspectable data, not
# merged), a stand-in `pkgs` and a `config` made of the modules' own option defaults plus `settings`.
# What it proves: the definitions each module makes (unit ordering, matches, option declarations). What
# it cannot: nixpkgs' merging and type checking, which the modules cite by file instead.
{ module, system ? "x86_64-linux", settings ? { }, nixpkgsConfig ? { } }:
let
  inherit (builtins) attrNames filter listToAttrs mapAttrs isAttrs;

  type = name: extra: { _type = "type"; inherit name; } // extra;
  types = {
    bool = type "bool" { };
    package = type "package" { };
    str = type "str" { };
    singleLineStr = type "singleLineStr" { };
    anything = type "anything" { };
    path = type "path" { };
    ints = {
      positive = type "ints.positive" { };
      between = low: high: type "ints.between" { inherit low high; };
    };
    numbers = {
      positive = type "numbers.positive" { };
      nonnegative = type "numbers.nonnegative" { };
    };
    nullOr = inner: type "nullOr" { inherit inner; };
    listOf = inner: type "listOf" { inherit inner; };
    nonEmptyListOf = inner: type "nonEmptyListOf" { inherit inner; };
    attrsOf = inner: type "attrsOf" { inherit inner; };
    submodule = options: type "submodule" { inherit options; };
    strMatching = pattern: type "strMatching" { inherit pattern; };
    enum = values: type "enum" { inherit values; };
  };

  lib = {
    inherit types;
    mkOption = declaration: declaration // { _type = "option"; };
    mkIf = condition: content: { _type = "if"; inherit condition content; };
    mkDefault = content: { _type = "override"; priority = 1000; inherit content; };
    literalExpression = text: { _type = "literalExpression"; inherit text; };
    getExe = drv: "${drv.outPath}/bin/${drv.meta.mainProgram}";
    filterAttrs = pred: set: listToAttrs (map (name: { inherit name; value = set.${name}; })
      (filter (name: pred name set.${name}) (attrNames set)));
    mapAttrs' = f: set: listToAttrs (map (name: f name set.${name}) (attrNames set));
    nameValuePair = name: value: { inherit name value; };
    escapeShellArg = s: "'${s}'";
  };

  fake = name: { outPath = "/nix/store/stand-in-${name}"; name = name; meta.mainProgram = name; };
  pkgs = {
    stdenv.hostPlatform = {
      inherit system;
      isx86 = system == "x86_64-linux";
      isAarch64 = system == "aarch64-linux";
    };
    callPackage = _: _: fake "nix-dabei";
    writeShellScript = name: _: "/nix/store/stand-in-${name}";
    gptfdisk = fake "gptfdisk";
    cloud-utils.guest = fake "cloud-utils-guest";
    util-linux = fake "util-linux";
    gawk = fake "gawk";
    git = fake "git";
    zstd = fake "zstd";
  };

  # Option declarations -> their defaults (what `config` holds when nothing else sets them).
  defaultsOf = options:
    mapAttrs (_: value:
      if isAttrs value && value._type or null == "option" then value.default or null
      else if isAttrs value then defaultsOf value
      else value) options;

  recursiveUpdate = left: right:
    left // mapAttrs (name: value:
      if isAttrs value && isAttrs (left.${name} or null) && !(value ? _type) then recursiveUpdate left.${name} value
      else value) right;

  args = { inherit config lib pkgs; modulesPath = "/nixpkgs/nixos/modules"; };
  modules = [ ../../../nix/modules/instance-data.nix ../../../nix/modules/hetzner-networking.nix
              ../../../nix/modules/zfs-image.nix ../../../nix/modules/firstboot.nix ];
  allDefaults = builtins.foldl' (acc: m: recursiveUpdate acc (defaultsOf ((import m args).options or { }))) { } modules;

  config = recursiveUpdate ({
    systemd.package = fake "systemd";
    nix.package = fake "nix";
    system.build.nixos-rebuild = fake "nixos-rebuild";
    boot.zfs.package = fake "zfs";
    networking.hostId = allDefaults.nix-dabei.hostId;
    fileSystems."/".device = "${allDefaults.nix-dabei.poolName}/local/root";
  } // { nix-dabei = recursiveUpdate allDefaults.nix-dabei (settings.nix-dabei or { }); }) nixpkgsConfig;
  evaluated = import module args;
in
# A module without `options`/`config` is all config (the shorthand form).
if evaluated ? config || evaluated ? options then evaluated else { config = removeAttrs evaluated [ "imports" ]; }
