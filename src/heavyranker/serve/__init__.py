"""Using a trained model: export (export.py) to a folder that scorer.py loads with torch alone (and
onnxruntime for an ONNX model), then batch prediction over TFRecord files (predict.py) or an HTTP ranking
service (app.py, request.py)."""
