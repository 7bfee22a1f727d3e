"""What operators run on the box and the daemon never imports: ``qwenbox bench`` and
``qwenbox logs``, with the statistics, report formatting and unix-socket client they
share with the tests. ``qwenbox serve`` imports nothing from here."""
