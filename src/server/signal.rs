//! A one-waiter wake-up flag for tasks of one runtime thread (no atomics: never crosses
//! threads).

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::task::{Poll, Waker};

/// Set by `notify`, consumed by `wait`. A notify before the wait is not lost.
#[derive(Default)]
pub struct Signal {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    /// Wake the waiter (or the next one to wait).
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Wait until notified; consumes the notification.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.flag.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}
