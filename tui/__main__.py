from gptchat.tui.cli.main import main

main()
