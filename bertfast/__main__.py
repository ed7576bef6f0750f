from bertfast.cli import main

raise SystemExit(main())
