from flowhand.entry import main

raise SystemExit(main())
