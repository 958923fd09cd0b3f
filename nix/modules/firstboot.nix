# The per-host seed and the first boot: systemd units running the `nix-dabei` program.
#   nix-dabei-seed      every boot, before sshd: a new seed is applied (host key, root's authorized keys,
#                       flake), recorded and wiped; a seed already applied (wipe failed) is only wiped
#   nix-dabei-network   every boot, before networkd: the uplink file from the persisted instance data
#   nix-dabei-firstboot after network-online, while /var/lib/nix-dabei/pending exists: metadata, network,
#                       nixos-rebuild switch --flake <flake>#<hostname> with retries; status.json throughout
#   nix-dabei-watchdog  at boot, while a switch waits for the deployer's confirmation (confirm.json): rolls
#                       it back when its window ends unconfirmed (a reboot ended the transient watchdog
#                       `nix-dabei apply --confirm-seconds` had started with systemd-run)
{ config, lib, pkgs, ... }:
let
  cfg = config.nix-dabei.firstboot;
  program = lib.getExe cfg.package;
  stateDir = "/var/lib/nix-dabei";
  # The host's identity, written by `nix-dabei seed` (dabei_firstboot/config.py: HOST_KEY,
  # ROOT_AUTHORIZED_KEYS) on safe/var: rolling local/root back to its blank snapshot keeps it.
  sshDir = "${stateDir}/ssh";
  systemctl = "${config.systemd.package}/bin/systemctl";
  # nixos-rebuild runs switch-to-configuration in a transient unit (systemd-run
  # --unit=nixos-rebuild-switch-to-configuration, some releases with a suffix) that keeps running when
  # the rebuild is killed after its timeout; another switch under that name fails to start. Wait for it to
  # end and clear a failed one before each attempt (the program bounds this by rebuildTimeoutSeconds).
  waitForSwitch = pkgs.writeShellScript "nix-dabei-wait-for-switch" ''
    while ${systemctl} is-active --quiet 'nixos-rebuild-switch-to-configuration*.service'; do sleep 5; done
    ${systemctl} reset-failed 'nixos-rebuild-switch-to-configuration*.service' 2>/dev/null || true
  '';
  # The confirmation watchdog of an in-place switch, outside the SSH session that runs `nix-dabei apply`: a
  # transient unit has no file in /etc/systemd/system, so switch-to-configuration (which stops, starts and
  # restarts the units whose files differ between the old and the new system) leaves it running; it
  # survives the deployer's disconnect and rolls back with the previous generation's own
  # switch-to-configuration (absolute store paths: a transient unit's PATH is minimal).
  watchdogCommand = [ "${config.systemd.package}/bin/systemd-run" "--unit=nix-dabei-watchdog-{token}"
    "--description=nix-dabei: roll back switch {token} unless confirmed" "--collect" "--quiet"
    "--property=KillMode=process" program "watchdog" "--token" "{token}" ];
  programConfig = {
    root = "/";
    metadata_url = cfg.metadataUrl;
    metadata_retries = cfg.metadataRetries;
    metadata_backoff_seconds = cfg.metadataBackoffSeconds;
    metadata_backoff_max_seconds = cfg.metadataBackoffMaxSeconds;
    metadata_timeout_seconds = cfg.metadataTimeoutSeconds;
    rebuild_command = cfg.rebuildCommand;
    rebuild_retries = cfg.rebuildRetries;
    rebuild_backoff_seconds = cfg.rebuildBackoffSeconds;
    rebuild_timeout_seconds = cfg.rebuildTimeoutSeconds;
    seed_device = cfg.seedDevice;
    journal_command = [ "${config.systemd.package}/bin/journalctl" "--unit=nix-dabei-firstboot.service"
      "--unit=nix-dabei-seed.service" "--lines=80" "--no-pager" "--output=short-iso" ];
    network_reload_command = [ "${config.systemd.package}/bin/networkctl" "reload" ];
    switch_wait_command = [ "${waitForSwitch}" ];
    # `nix-dabei grow` (zfs-image.nix) expands this pool after its partition.
    grow_pool = config.nix-dabei.poolName or null;
    # What `nixos-rebuild switch --rollback` runs, to the generation recorded before the switch
    # (nixpkgs pkgs/by-name/ni/nixos-rebuild-ng/src/nixos_rebuild/nix.py: rollback, switch_to_configuration).
    switch_generation_command = [ "${config.nix.package}/bin/nix-env" "--profile" "/nix/var/nix/profiles/system"
      "--switch-generation" "{generation}" ];
    activate_command = [ "{system}/bin/switch-to-configuration" "switch" ];
    watchdog_command = watchdogCommand;
    # `nix-dabei receive --inputs`: flake inputs the deployer sends (zstd-compressed `nix-store --export`).
    nix_store_command = [ "${config.nix.package}/bin/nix-store" ];
    decompress_command = [ "${pkgs.zstd}/bin/zstd" "-dc" ];
  };
  # Upper bound of one first-boot run: every metadata and rebuild attempt plus the waits between them.
  worstCaseSeconds =
    cfg.metadataRetries * (2 * cfg.metadataTimeoutSeconds + cfg.metadataBackoffMaxSeconds)
    + cfg.rebuildRetries * (cfg.rebuildTimeoutSeconds + cfg.rebuildBackoffSeconds * cfg.rebuildRetries)
    + 300;
  # A switch must not restart these units: the rebuild they run is that switch.
  common = {
    restartIfChanged = false;
    stopIfChanged = false;
  };
  # Oneshot: units ordered after these (sshd after the seed) wait until the program has finished.
  oneshot = {
    Type = "oneshot";
    RemainAfterExit = true;
  };
in
{
  options.nix-dabei.firstboot = {
    enable = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = "Run the seed and first-boot units.";
    };
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.callPackage ../firstboot/package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./nix/firstboot/package.nix { }";
      description = "The `nix-dabei` first-boot program.";
    };
    metadataUrl = lib.mkOption {
      type = lib.types.str;
      default = "http://169.254.169.254/hetzner/v1/metadata";
      description = "URL of the instance metadata (YAML).";
    };
    metadataRetries = lib.mkOption {
      type = lib.types.ints.positive;
      default = 20;
      description = "Attempts to fetch the metadata before the first boot fails.";
    };
    metadataBackoffSeconds = lib.mkOption {
      type = lib.types.numbers.nonnegative;
      default = 1;
      description = "Wait after the first failed metadata attempt; doubles after each further failure.";
    };
    metadataBackoffMaxSeconds = lib.mkOption {
      type = lib.types.numbers.nonnegative;
      default = 15;
      description = "Upper bound of the wait between metadata attempts.";
    };
    metadataTimeoutSeconds = lib.mkOption {
      type = lib.types.numbers.positive;
      default = 5;
      description = "Timeout of one metadata request (connect and each read; the whole answer gets twice that).";
    };
    rebuildCommand = lib.mkOption {
      type = lib.types.nonEmptyListOf lib.types.str;
      default = [ "nixos-rebuild" "switch" "--flake" "{flake}#{hostname}" ];
      description = "The rebuild command; `{flake}` and `{hostname}` are replaced (flake from the seed, hostname from the metadata).";
    };
    rebuildRetries = lib.mkOption {
      type = lib.types.ints.positive;
      default = 3;
      description = "Rebuild attempts before the first boot fails.";
    };
    rebuildBackoffSeconds = lib.mkOption {
      type = lib.types.numbers.nonnegative;
      default = 10;
      description = "Wait after failed rebuild attempt n is n times this.";
    };
    rebuildTimeoutSeconds = lib.mkOption {
      type = lib.types.numbers.positive;
      default = 3600;
      description = "One rebuild attempt is killed after this long.";
    };
    seedDevice = lib.mkOption {
      type = lib.types.str;
      default = "auto";
      description = "Disk holding the `dabei-seed` partition, or \"auto\" to find it by reading the GPT of every disk.";
    };
  };

  options.nix-dabei.extraAuthorizedKeys = lib.mkOption {
    type = lib.types.listOf lib.types.singleLineStr;
    default = [ ];
    description = "SSH public keys for root, in addition to the ones from the seed (one key per entry).";
  };

  config = lib.mkIf cfg.enable {
    environment.etc."nix-dabei/config.json".text = builtins.toJSON programConfig;
    environment.systemPackages = [ cfg.package ];
    users.users.root.openssh.authorizedKeys.keys = config.nix-dabei.extraAuthorizedKeys;

    nix.settings.experimental-features = [ "nix-command" "flakes" ];

    services.openssh = {
      enable = true;
      # Only the ed25519 key: the seed provides it, so sshd never generates one the installer does not know.
      hostKeys = [ { type = "ed25519"; path = "${sshDir}/ssh_host_ed25519_key"; } ];
      # Root's keys from the seed; %u keeps every other user to their own (empty) file. Appended to the
      # module's defaults (a list option: nixos/modules/services/networking/ssh/sshd.nix).
      authorizedKeysFiles = [ "${sshDir}/authorized_keys.d/%u" ];
      settings.PermitRootLogin = lib.mkDefault "prohibit-password";
      settings.PasswordAuthentication = lib.mkDefault false;
    };

    systemd.tmpfiles.rules = [ "d ${stateDir} 0755 root root -" "d ${sshDir} 0755 root root -" ];

    systemd.services.nix-dabei-seed = common // {
      description = "Apply the nix-dabei per-host seed (host key, authorized keys, flake)";
      wantedBy = [ "multi-user.target" "sshd.service" ];
      # sshd-keygen.service: where a NixOS release generates missing host keys outside sshd.service.
      before = [ "sshd.service" "sshd-keygen.service" ];
      # No condition: the partition's content decides (a seed whose wipe failed is wiped on a later boot).
      # nix-dabei-grow (zfs-image.nix) is ordered after this unit: it rewrites the GPT read here.
      after = [ "local-fs.target" "systemd-udev-settle.service" ];
      serviceConfig = oneshot // { ExecStart = "${program} seed"; };
    };

    # Early-boot unit: default dependencies would order it after basic.target, and networkd (which has
    # none) would wait for all of that on every boot. Only /var (local-fs) is needed.
    systemd.services.nix-dabei-network = common // {
      description = "Configure the uplink from the nix-dabei instance data";
      wantedBy = [ "systemd-networkd.service" "multi-user.target" ];
      before = [ "systemd-networkd.service" "network-pre.target" "shutdown.target" ];
      wants = [ "network-pre.target" ];
      after = [ "local-fs.target" ];
      conflicts = [ "shutdown.target" ];
      unitConfig = {
        DefaultDependencies = false;
        ConditionPathExists = "${stateDir}/instance-data.json";
      };
      serviceConfig = oneshot // { ExecStart = "${program} network"; };
    };

    # Ordered after multi-user.target (like nixpkgs' amazon-init, which also runs nixos-rebuild switch):
    # the boot transaction then does not wait for the rebuild, and units the switch starts cannot wait
    # for multi-user.target while it waits for this unit.
    systemd.services.nix-dabei-firstboot = common // {
      description = "nix-dabei first boot: metadata, network, nixos-rebuild --flake";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-dabei-seed.service" "nix-daemon.socket" "multi-user.target" ];
      # A configuration without this module must not stop the run that is switching to it.
      unitConfig = {
        ConditionPathExists = "${stateDir}/pending";
        X-StopOnRemoval = false;
      };
      path = [ config.system.build.nixos-rebuild config.nix.package pkgs.git config.systemd.package ];
      environment.HOME = "/root";
      serviceConfig = oneshot // {
        ExecStart = "${program} firstboot";
        TimeoutStartSec = toString (builtins.ceil worstCaseSeconds);
      };
    };

    # A reboot during a confirmation window ends the transient watchdog, and the boot loader's default is
    # the unconfirmed generation: watch it again (it rolls back at once when the window is over).
    systemd.services.nix-dabei-watchdog = common // {
      description = "nix-dabei: roll back an unconfirmed switch";
      wantedBy = [ "multi-user.target" ];
      after = [ "local-fs.target" "nix-daemon.socket" ];
      unitConfig = {
        ConditionPathExists = "${stateDir}/confirm.json";
        X-StopOnRemoval = false;
      };
      path = [ config.nix.package config.systemd.package ];
      serviceConfig = {
        Type = "simple";
        ExecStart = "${program} watchdog";
        # The rollback's switch-to-configuration may stop this unit's dependencies: keep its own process.
        KillMode = "process";
      };
    };
  };
}
