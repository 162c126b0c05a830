from coscale.cli import main

raise SystemExit(main())
