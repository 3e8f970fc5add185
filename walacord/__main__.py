from walacord.cli import main

raise SystemExit(main())
