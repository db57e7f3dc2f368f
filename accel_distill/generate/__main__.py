from accel_distill.generate.cli import main

raise SystemExit(main())
