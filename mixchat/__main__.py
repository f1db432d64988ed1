from mixchat.cli import main

raise SystemExit(main())
