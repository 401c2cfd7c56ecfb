from deployd_client.cli import main

raise SystemExit(main())
