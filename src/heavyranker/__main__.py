from heavyranker.cli import main

raise SystemExit(main())
