from lbd.cli import main

raise SystemExit(main())
