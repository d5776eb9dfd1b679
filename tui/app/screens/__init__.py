"""The app's screens: chat (home), compare, history, model picker, help, and small dialogs."""
