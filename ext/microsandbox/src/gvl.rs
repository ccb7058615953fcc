//! Running engine work without the GVL, interruptibly.
//!
//! [`run`] releases the GVL with `rb_thread_call_without_gvl2` and passes an unblock
//! function that cancels the future, so `Thread#kill`, `Timeout.timeout` and Ctrl-C stop
//! a blocked call: the future is dropped (its sockets close, children are killed) and
//! the call returns [`Error::Cancelled`]; `errors::to_ruby` then raises the pending Ruby
//! interrupt through magnus (`thread_check_ints`, protected), once every Rust frame has
//! returned. The `2` variant matters: plain `rb_thread_call_without_gvl` checks
//! interrupts itself before and after the body and would `longjmp` straight over this
//! frame and the magnus method above it, skipping their destructors. The price: Ruby
//! skips the body when any interrupt flag is set on entry (often only the scheduler's
//! timer), so [`run`] handles the interrupt itself and retries. A panic inside is
//! caught and returned as an error; it never unwinds through Ruby's C frames.

use std::cell::RefCell;
use std::ffi::c_void;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};

use microsandbox::Error;
use tokio_util::sync::CancellationToken;

struct Call<F: Future> {
    fut: Option<F>,
    token: CancellationToken,
    out: Option<Result<F::Output, String>>,
}

unsafe extern "C" fn body<T, F: Future<Output = Result<T, Error>>>(data: *mut c_void) -> *mut c_void {
    let call = &mut *(data as *mut Call<F>);
    let fut = call.fut.take().expect("future present");
    let token = call.token.clone();
    let res = catch_unwind(AssertUnwindSafe(|| {
        crate::runtime::get().block_on(async move {
            tokio::select! {
                r = fut => r,
                _ = token.cancelled() => Err(Error::Cancelled),
            }
        })
    }));
    call.out = Some(res.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    }));
    std::ptr::null_mut()
}

unsafe extern "C" fn unblock(data: *mut c_void) {
    let token = &*(data as *const CancellationToken);
    token.cancel();
}

thread_local! {
    /// A Ruby interrupt that [`run`] took while retrying a skipped body; `to_ruby` raises
    /// it in place of the `Cancelled` error that [`run`] returned with it.
    static PENDING_INTERRUPT: RefCell<Option<magnus::Error>> = const { RefCell::new(None) };
}

/// The interrupt [`run`] took from Ruby on this thread, if any (see `errors::to_ruby`).
pub fn take_pending_interrupt() -> Option<magnus::Error> {
    PENDING_INTERRUPT.with(|p| p.borrow_mut().take())
}

/// Runs `fut` to completion with the GVL released. Must be called with the GVL held.
pub fn run<T, F>(fut: F) -> Result<T, Error>
where
    F: Future<Output = Result<T, Error>>,
{
    PENDING_INTERRUPT.with(|p| p.borrow_mut().take());
    let token = CancellationToken::new();
    let mut call = Call { fut: Some(fut), token: token.clone(), out: None };
    let outcome = loop {
        unsafe {
            rb_sys::rb_thread_call_without_gvl2(
                Some(body::<T, F>),
                &mut call as *mut Call<F> as *mut c_void,
                Some(unblock),
                &token as *const CancellationToken as *mut c_void,
            );
        }
        if let Some(outcome) = call.out.take() {
            break outcome;
        }
        // Ruby skipped the body because an interrupt flag was set on entry — most often
        // just the thread scheduler's timer. The future was never polled, so handle the
        // interrupt here (trap handlers run, a pending raise/kill is taken) and try again.
        let Ok(ruby) = magnus::Ruby::get() else { return Err(Error::Cancelled) };
        if let Err(interrupt) = ruby.thread_check_ints() {
            PENDING_INTERRUPT.with(|p| *p.borrow_mut() = Some(interrupt));
            return Err(Error::Cancelled);
        }
    };
    match outcome {
        Ok(r) => r,
        Err(panic) => Err(Error::Runtime(format!("internal error (a bug in microsandbox, please report it): {panic}"))),
    }
}
