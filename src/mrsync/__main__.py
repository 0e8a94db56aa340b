from mrsync.cli import main

raise SystemExit(main())
