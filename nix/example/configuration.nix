# An example host: what a user's flake puts in nixosConfigurations.<hostname> (hostname from the metadata).
{ pkgs, ... }:
{
  networking.hostName = "web-1";
  nix-dabei = {
    # Pool, datasets, host id and boot layout are facts of the shared image (read-only options).
    firstboot.rebuildRetries = 3;
    extraAuthorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKqHqkGqjvnS3VGr2bAJTD1i2Wn1wZz7Cq2r8b5UZkq3 ops@example" ];
  };
  services.nginx.enable = true;
  networking.firewall.allowedTCPPorts = [ 22 80 ];
  environment.systemPackages = [ pkgs.htop ];
  system.stateVersion = "26.05";
}
