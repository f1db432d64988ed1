from mixchat.frontends.cli import main

raise SystemExit(main())
