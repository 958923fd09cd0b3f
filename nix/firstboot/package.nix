# The first-boot program `nix-dabei` (dabei_firstboot): Python standard library + PyYAML.
{ python3Packages }:
python3Packages.buildPythonPackage {
  pname = "nix-dabei-firstboot";
  version = "0.1.0";
  pyproject = true;
  src = ./.;
  build-system = [ python3Packages.setuptools ];
  dependencies = [ python3Packages.pyyaml ];
  # Its tests live in the project's tests/nix and need gdisk and a local HTTP server.
  doCheck = false;
  pythonImportsCheck = [ "dabei_firstboot.seed" "dabei_firstboot.cli" ];
  meta.mainProgram = "nix-dabei";
}
