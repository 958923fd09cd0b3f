# A web server: nginx on port 80, which the stack's `web` health check probes after every switch.
{ ... }:
{
  services.nginx.enable = true;
  services.nginx.virtualHosts.default.default = true;
  networking.firewall.allowedTCPPorts = [ 80 ];
}
