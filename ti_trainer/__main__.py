from ti_trainer.cli import main

raise SystemExit(main())
