//! The 16550A UART on COM1, from vm-superio, with its interrupt line and output sink injected.
//!
//! Input is pushed by the VMM's event loop, never more than the UART's FIFO has room for;
//! when the guest drains the FIFO the device signals `rx_space`, and the event loop reads
//! more. So a host flooding the console never makes the VMM buffer without bound or spin.

use std::io::{self, Write};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::persist::{Persist, StateError};
use crate::Interrupt;

/// COM1's base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1's IRQ.
pub const COM1_IRQ: u32 = 4;
/// Registers of a UART.
pub const UART_LEN: u16 = 8;

/// Adapts an [`Interrupt`] to vm-superio's trigger.
pub struct IrqTrigger(Arc<dyn Interrupt>);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.trigger()
    }
}

/// Signals the event loop when the guest has emptied the receive FIFO.
pub struct RxSpace(Arc<dyn Interrupt>);

impl SerialEvents for RxSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.trigger() {
            log::warn!("serial: cannot signal input space: {e}");
        }
    }
}

/// The UART on the PIO bus.
pub struct SerialDevice {
    serial: Serial<IrqTrigger, RxSpace, Box<dyn Write + Send>>,
    irq: Arc<dyn Interrupt>,
    rx_space: Arc<dyn Interrupt>,
}

impl SerialDevice {
    /// A UART raising `irq`, writing guest output to `out`, signalling `rx_space` when the
    /// guest has read all queued input.
    pub fn new(
        irq: Arc<dyn Interrupt>,
        rx_space: Arc<dyn Interrupt>,
        out: Box<dyn Write + Send>,
    ) -> Self {
        SerialDevice {
            serial: Serial::with_events(IrqTrigger(irq.clone()), RxSpace(rx_space.clone()), out),
            irq,
            rx_space,
        }
    }

    /// Bytes of input the FIFO can take now.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken (at most
    /// [`Self::input_capacity`]).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.serial.fifo_capacity().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue input: {e:?}");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.serial.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Some(&value), Ok(off)) = (data.first(), u8::try_from(offset)) else {
            return;
        };
        // Output errors (a full pty, a closed pipe) lose the byte, as on a real line.
        if let Err(e) = self.serial.write(off, value) {
            log::debug!("serial: output byte lost: {e:?}");
        }
    }
}

/// The UART's registers and receive FIFO (vm-superio's `SerialState`, as serde data).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// IIR bit 0: no interrupt pending.
const IIR_NONE_PENDING: u8 = 1;

impl Persist for SerialDevice {
    type State = SerialDeviceState;

    fn save(&self) -> SerialDeviceState {
        let s = self.serial.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART that had an interrupt pending (a guest waiting for "transmitter empty" to send
    /// its next byte, say) raises it again: the edge it fired before the snapshot is gone.
    fn restore(&mut self, st: &SerialDeviceState) -> Result<(), StateError> {
        let state = SerialState {
            baud_divisor_low: st.baud_divisor_low,
            baud_divisor_high: st.baud_divisor_high,
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer.clone(),
        };
        let placeholder = Serial::with_events(
            IrqTrigger(self.irq.clone()),
            RxSpace(self.rx_space.clone()),
            Box::new(io::sink()) as Box<dyn Write + Send>,
        );
        let old = std::mem::replace(&mut self.serial, placeholder);
        let out = old.into_writer();
        self.serial = Serial::from_state(
            &state,
            IrqTrigger(self.irq.clone()),
            RxSpace(self.rx_space.clone()),
            out,
        )
        .map_err(|e| StateError::new("serial", format!("{e:?}")))?;
        if st.interrupt_identification & IIR_NONE_PENDING == 0 {
            if let Err(e) = self.irq.trigger() {
                log::warn!("serial: cannot raise the restored interrupt: {e}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::test_utils::CountingInterrupt;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (
        SerialDevice,
        Arc<CountingInterrupt>,
        Arc<CountingInterrupt>,
        SharedBuf,
    ) {
        let irq = Arc::new(CountingInterrupt::default());
        let space = Arc::new(CountingInterrupt::default());
        let out = SharedBuf::default();
        let dev = SerialDevice::new(irq.clone(), space.clone(), Box::new(out.clone()));
        (dev, irq, space, out)
    }

    fn read(d: &mut SerialDevice, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn guest_output_reaches_the_sink() {
        let (mut d, _, _, out) = uart();
        for b in b"hi\n" {
            d.write(DATA, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
    }

    #[test]
    fn input_raises_irq_and_is_read_in_order() {
        let (mut d, irq, space, _) = uart();
        d.write(IER, &[1]); // received-data interrupt on
        let before = irq.count();
        assert_eq!(d.queue_input(b"ab"), 2);
        assert!(irq.count() > before);
        assert_ne!(read(&mut d, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read(&mut d, DATA), b'a');
        assert_eq!(space.count(), 0);
        assert_eq!(read(&mut d, DATA), b'b');
        assert_eq!(space.count(), 1, "drained FIFO is signalled");
        assert_eq!(read(&mut d, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_flood_is_bounded_by_the_fifo() {
        let (mut d, _, _, _) = uart();
        let cap = d.input_capacity();
        assert!(cap > 0);
        assert_eq!(d.queue_input(&vec![b'x'; 100_000]), cap);
        assert_eq!(d.input_capacity(), 0);
        assert_eq!(d.queue_input(b"more"), 0);
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut d, _, _, _) = uart();
        let mut wide = [0u8; 4];
        d.read(u64::MAX, &mut wide);
        d.read(3, &mut []);
        d.write(7, &[]);
        d.write(1000, &[1, 2, 3, 4]);
    }

    #[test]
    fn state_round_trips_and_a_pending_interrupt_is_raised_again() {
        let (mut a, _, _, _) = uart();
        a.write(IER, &[0x02]); // transmitter-empty interrupt on: it is now pending
        a.write(3, &[0x1b]);
        a.queue_input(b"xy");
        let (mut b, irq_b, _, out_b) = uart();
        crate::persist::assert_round_trip(&a, &mut b);
        assert!(irq_b.count() >= 1, "pending interrupt raised again");
        b.write(DATA, b"z");
        assert_eq!(
            out_b.0.lock().unwrap().as_slice(),
            b"z",
            "output still flows"
        );
        assert_eq!(read(&mut b, DATA), b'x');
        let bad = SerialDeviceState {
            in_buffer: vec![0; 100_000],
            ..a.save()
        };
        assert!(b.restore(&bad).is_err());
    }
}
