"""The interface: the stage-3 viewer and toggles (anywidget), figures and escaped HTML, the
papermill runner and the shareable report. Reads results; never imports torch."""
