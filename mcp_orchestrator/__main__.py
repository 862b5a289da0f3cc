from mcp_orchestrator.cli import main

raise SystemExit(main())
