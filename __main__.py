"""The Pulumi program: `pulumi up` installs the hosts of this stack's config (see dabei_component/program.py)."""

from dabei_component.program import main

main()
