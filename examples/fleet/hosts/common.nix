# What every host of the example fleet shares.
{ pkgs, ... }:
{
  # Hetzner's SSH keys of the stack config are root's keys already; more can be added here.
  nix-dabei.extraAuthorizedKeys = [ ];
  services.openssh.enable = true;
  networking.firewall.allowedTCPPorts = [ 22 ];
  environment.systemPackages = [ pkgs.htop ];
  system.stateVersion = "26.05";
}
