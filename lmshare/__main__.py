from lmshare.cli import main

raise SystemExit(main())
