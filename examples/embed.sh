.venv/bin/d2v-embed --text "hello world" "another one" --normalize   # JSON on stdout
.venv/bin/d2v-embed speech.wav photo.png -o vectors.npz               # one array per input
