from flowhand.cli import main

raise SystemExit(main())
