"""
A speed path of reading: decode ahead in a thread while the model works on what came before
(bench.evaluate_mcq's next question, data.video_chunks' next chunk of a streamed video).
"""
import queue
import threading


def read_ahead(items, ahead=32):
    """Iterate `items` in a thread, up to `ahead` in front of the caller: a video decodes while
    the model runs on the frames before."""
    slots, stop, end = queue.Queue(maxsize=ahead), threading.Event(), object()
    error = []  # what `items` raised: raised in the caller once the items before it are through

    def put(x):  # blocks while the queue is full, unless the caller has gone
        while not stop.is_set():
            try:
                return slots.put(x, timeout=0.1)
            except queue.Full:
                pass

    def work():
        try:
            for x in items:
                put(x)
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: B036  (handed to the caller, who raises it)
            error.append(e)
        put(end)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while (x := slots.get()) is not end:
            yield x
        if error:
            raise error[0]
    finally:
        stop.set()
        thread.join()
