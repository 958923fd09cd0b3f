# `nix flake check`: a NixOS VM boots with a seed disk and a fake metadata service, applies the seed,
# configures the uplink from the metadata and runs the (stubbed) rebuild until status.json says converged.
{ pkgs, self }:
let
  # NixOS test VMs give node 1 this MAC on its first VLAN interface.
  mac = "52:54:00:12:01:01";
  metadata = (import ./metadata.nix { inherit mac; }).current;
  # JSON is YAML: the fake service serves the document like Hetzner's does.
  metadataRoot = pkgs.writeTextDir "hetzner/v1/metadata" (builtins.toJSON metadata);
  nixDabei = pkgs.callPackage ../firstboot/package.nix { };

  # A small GPT disk with a dabei-seed partition holding a freshly generated host key.
  seedDisk = pkgs.runCommand "nix-dabei-seed-disk" {
    nativeBuildInputs = [ pkgs.gptfdisk pkgs.openssh (pkgs.python3.withPackages (_: [ nixDabei ])) ];
  } ''
    mkdir -p $out
    ssh-keygen -q -t ed25519 -N "" -C seed-test -f key
    truncate -s 8M $out/seed.img
    sgdisk --new=1:2048:+1M --typecode=1:8300 --change-name=1:dabei-seed $out/seed.img
    cp key.pub $out/host_key.pub
    python3 - <<'PY'
    import os
    from dabei_firstboot.seed import write_seed
    write_seed(os.environ["out"] + "/seed.img", {
        "flake": "github:example/hosts",
        "hostname": None,
        "host_key": {"type": "ssh-ed25519", "private": open("key").read(), "public": open("key.pub").read().strip()},
        "authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqHqkGqjvnS3VGr2bAJTD1i2Wn1wZz7Cq2r8b5UZkq3 ops@example"],
    })
    PY
  '';

  fakeRebuild = pkgs.writeShellScript "fake-nixos-rebuild" ''
    echo "$@" > /var/lib/nix-dabei/rebuild-args
  '';
in
pkgs.testers.runNixOSTest {
  name = "nix-dabei-firstboot";
  nodes.machine = { ... }: {
    imports = [
      self.nixosModules.instance-data
      self.nixosModules.hetzner-networking
      self.nixosModules.firstboot
    ];
    nix-dabei.firstboot = {
      package = nixDabei;
      metadataUrl = "http://127.0.0.1:8169/hetzner/v1/metadata";
      metadataBackoffSeconds = 1;
      rebuildCommand = [ "${fakeRebuild}" "{flake}" "{hostname}" ];
      rebuildBackoffSeconds = 1;
      # As on a server: the program finds the seed by reading the GPT of every disk.
      seedDevice = "auto";
    };
    # The seed disk straight from the store: snapshot=on opens it read-only and keeps the guest's writes
    # (the wipe) in a temporary overlay. (The test driver starts QEMU with TMPDIR set to the machine's
    # state directory, not the driver's, so a copy made by the test script would not be found.)
    virtualisation.qemu.options = [ "-drive file=${seedDisk}/seed.img,format=raw,if=virtio,snapshot=on" ];
    # The test VLAN has no DHCP server: network-online must not wait for it.
    systemd.network.wait-online.anyInterface = true;
    environment.systemPackages = [ pkgs.jq ];
    environment.etc."nix-dabei-test/host_key.pub".source = "${seedDisk}/host_key.pub";
    systemd.services.fake-metadata = {
      wantedBy = [ "multi-user.target" ];
      before = [ "nix-dabei-firstboot.service" ];
      serviceConfig.ExecStart = "${pkgs.python3}/bin/python3 -m http.server --bind 127.0.0.1 --directory ${metadataRoot} 8169";
    };
  };
  testScript = ''
    machine.start()
    machine.wait_for_unit("nix-dabei-seed.service")
    machine.succeed("cmp /var/lib/nix-dabei/ssh/ssh_host_ed25519_key.pub /etc/nix-dabei-test/host_key.pub")
    machine.succeed("grep -q ops@example /var/lib/nix-dabei/ssh/authorized_keys.d/root")
    machine.wait_until_succeeds(
        "jq -e '.phase == \"converged\"' /var/lib/nix-dabei/status.json", timeout=300
    )
    machine.succeed("test ! -e /var/lib/nix-dabei/pending")
    machine.succeed("grep -qx 'github:example/hosts installer-test' /var/lib/nix-dabei/rebuild-args")
    machine.succeed("grep -q 'PermanentMACAddress=${mac}' /run/systemd/network/10-nix-dabei-uplink.network")
    machine.wait_until_succeeds("ip -6 addr show | grep -q 2a01:4f8:c0c:7bc5::1", timeout=60)
    machine.succeed("nix-dabei status | jq -e '.status.hostname == \"installer-test\"'")
    # The seed was wiped: the partition holds only zeros now.
    machine.succeed("test -z \"$(head -c 4096 /dev/disk/by-partlabel/dabei-seed | tr -d '\\000')\"")
    machine.wait_for_unit("sshd.service")
  '';
}
