use super::*;
use conduit_abi::error;
use conduit_abi::irq::{
    ACTION_MASK, ACTION_TRIGGER, ACTION_UNMASK, DATA_BOOL, DATA_EVENT, DATA_MASK, DATA_NONE, FLAG_EVENTFD,
    FLAG_MASKABLE, FLAG_NORESIZE, INDEX_ERR, INDEX_INTX, INDEX_MSI, INDEX_MSIX, INDEX_REQ, MAX_COUNT, UNBIND, binding,
};
use proptest::prelude::*;
use std::vec::Vec;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Call {
    Enable(IrqIndex, u32),
    Disable(IrqIndex),
    Mask(IrqIndex, u32, MaskState),
    Trigger(IrqIndex, u32),
    Bind(IrqIndex, u32, Option<EventBinding>),
}

#[derive(Clone, Debug)]
struct FakeDevice {
    infos: [IrqInfo; 5],
    enabled: [u32; 5],
    calls: Vec<Call>,
    /// `bind` fails for this vector.
    fail_bind: Option<u32>,
    /// `enable` fails.
    fail_enable: Option<IrqError>,
}

fn slot(index: IrqIndex) -> usize {
    index.abi() as usize
}

impl FakeDevice {
    fn new(msi_maskable: bool) -> Self {
        Self {
            infos: [
                IrqInfo::NOT_OFFERED,
                IrqInfo::msi(8, msi_maskable),
                IrqInfo::msix(64),
                IrqInfo::software(),
                IrqInfo::software(),
            ],
            enabled: [0; 5],
            calls: Vec::new(),
            fail_bind: None,
            fail_enable: None,
        }
    }
}

impl IrqControl for FakeDevice {
    fn info(&self, index: IrqIndex) -> IrqInfo {
        self.infos[slot(index)]
    }
    fn enabled(&self, index: IrqIndex) -> u32 {
        self.enabled[slot(index)]
    }
    fn enable(&mut self, index: IrqIndex, count: u32) -> Result<(), IrqError> {
        self.calls.push(Call::Enable(index, count));
        if let Some(e) = self.fail_enable {
            return Err(e);
        }
        self.enabled[slot(index)] = if index == IrqIndex::Msi { count.next_power_of_two() } else { count };
        Ok(())
    }
    fn disable(&mut self, index: IrqIndex) {
        self.calls.push(Call::Disable(index));
        self.enabled[slot(index)] = 0;
    }
    fn mask(&mut self, index: IrqIndex, vector: u32, state: MaskState) -> Result<(), IrqError> {
        self.calls.push(Call::Mask(index, vector, state));
        Ok(())
    }
    fn trigger(&mut self, index: IrqIndex, vector: u32) -> Result<(), IrqError> {
        self.calls.push(Call::Trigger(index, vector));
        Ok(())
    }
    fn bind(&mut self, index: IrqIndex, vector: u32, b: Option<EventBinding>) -> Result<(), IrqError> {
        self.calls.push(Call::Bind(index, vector, b));
        if self.fail_bind == Some(vector) {
            return Err(IrqError::NoSpace);
        }
        Ok(())
    }
}

fn events(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_le_bytes()).collect()
}

fn eb(vcpu: u8, vector: u8) -> Option<EventBinding> {
    Some(EventBinding { vcpu, vector })
}

const TRIG_NONE: u64 = DATA_NONE | ACTION_TRIGGER;
const TRIG_BOOL: u64 = DATA_BOOL | ACTION_TRIGGER;
const TRIG_EVENT: u64 = DATA_EVENT | ACTION_TRIGGER;

#[test]
fn info_per_index() {
    let dev = FakeDevice::new(false);
    assert_eq!(irq_info(&dev, INDEX_INTX), Ok(0));
    assert_eq!(irq_info(&dev, INDEX_MSI), Ok(8 | (FLAG_EVENTFD | FLAG_NORESIZE) << 32));
    assert_eq!(irq_info(&dev, INDEX_MSIX), Ok(64 | (FLAG_EVENTFD | FLAG_MASKABLE) << 32));
    assert_eq!(irq_info(&dev, INDEX_ERR), Ok(1 | FLAG_EVENTFD << 32));
    assert_eq!(irq_info(&dev, INDEX_REQ), Ok(1 | FLAG_EVENTFD << 32));
    assert_eq!(irq_info(&dev, 5), Err(IrqError::BadIndex));
    assert_eq!(irq_info(&dev, u64::MAX).map_err(IrqError::code), Err(error::EINVAL));
    let dev = FakeDevice::new(true);
    assert_eq!(irq_info(&dev, INDEX_MSI), Ok(8 | (FLAG_EVENTFD | FLAG_NORESIZE | FLAG_MASKABLE) << 32));
    // A device that gets NORESIZE wrong is corrected.
    let mut dev = FakeDevice::new(false);
    dev.infos[1].flags &= !(FLAG_NORESIZE as u32);
    dev.infos[2].flags |= FLAG_NORESIZE as u32;
    assert_ne!(irq_info(&dev, INDEX_MSI).unwrap() >> 32 & FLAG_NORESIZE, 0);
    assert_eq!(irq_info(&dev, INDEX_MSIX).unwrap() >> 32 & FLAG_NORESIZE, 0);
}

/// (name, index, start, count, flags, data, expected error)
type Case = (&'static str, u64, u64, u64, u64, Vec<u8>, IrqError);

#[test]
fn malformed_requests() {
    use IrqError::*;
    #[rustfmt::skip]
    let cases: &[Case] = &[
        ("unknown index", 5, 0, 1, TRIG_NONE, vec![], BadIndex),
        ("huge index", u64::MAX, 0, 1, TRIG_NONE, vec![], BadIndex),
        ("unknown flag bit", INDEX_MSIX, 0, 1, TRIG_NONE | 1 << 6, vec![], BadFlags),
        ("high flag bit", INDEX_MSIX, 0, 1, TRIG_NONE | 1 << 63, vec![], BadFlags),
        ("no data flag", INDEX_MSIX, 0, 1, ACTION_TRIGGER, vec![], BadFlags),
        ("two data flags", INDEX_MSIX, 0, 1, DATA_NONE | DATA_BOOL | ACTION_TRIGGER, vec![], BadFlags),
        ("no action flag", INDEX_MSIX, 0, 1, DATA_NONE, vec![], BadFlags),
        ("two action flags", INDEX_MSIX, 0, 1, DATA_NONE | ACTION_MASK | ACTION_UNMASK, vec![], BadFlags),
        ("event data with mask", INDEX_MSIX, 0, 1, DATA_EVENT | ACTION_MASK, vec![0; 8], BadFlags),
        ("event data with unmask", INDEX_MSIX, 0, 1, DATA_EVENT | ACTION_UNMASK, vec![0; 8], BadFlags),
        ("count above MAX_COUNT", INDEX_MSIX, 0, MAX_COUNT + 1, TRIG_NONE, vec![], BadRange),
        ("start + count overflows", INDEX_MSIX, u64::MAX, 2, TRIG_NONE, vec![], BadRange),
        ("start past the index", INDEX_MSIX, 64, 1, TRIG_NONE, vec![], BadRange),
        ("end past the index", INDEX_MSIX, 60, 5, TRIG_NONE, vec![], BadRange),
        ("INTx is not offered", INDEX_INTX, 0, 1, TRIG_NONE, vec![], BadRange),
        ("INTx disable is not offered either", INDEX_INTX, 0, 0, TRIG_NONE, vec![], BadRange),
        ("disable with start past the index", INDEX_MSI, 8, 0, TRIG_NONE, vec![], BadRange),
        ("count 0 with bool data", INDEX_MSIX, 0, 0, TRIG_BOOL, vec![], BadRange),
        ("count 0 with mask", INDEX_MSIX, 0, 0, DATA_NONE | ACTION_MASK, vec![], BadRange),
        ("count 0 with event data", INDEX_MSIX, 0, 0, TRIG_EVENT, vec![], BadRange),
        ("mask on MSI without per-vector masking", INDEX_MSI, 0, 1, DATA_NONE | ACTION_MASK, vec![], NotMaskable),
        ("unmask on ERR", INDEX_ERR, 0, 1, DATA_NONE | ACTION_UNMASK, vec![], NotMaskable),
        ("data with DATA_NONE", INDEX_ERR, 0, 1, TRIG_NONE, vec![1], BadData),
        ("bool data too short", INDEX_ERR, 0, 1, TRIG_BOOL, vec![], BadData),
        ("bool data too long", INDEX_ERR, 0, 1, TRIG_BOOL, vec![1, 1], BadData),
        ("bool byte 2", INDEX_ERR, 0, 1, TRIG_BOOL, vec![2], BadData),
        ("event data too short", INDEX_ERR, 0, 1, TRIG_EVENT, vec![0; 7], BadData),
        ("event with reserved bits", INDEX_ERR, 0, 1, TRIG_EVENT, events(&[1 << 16 | 0x40]), BadData),
        ("event with a reserved vector", INDEX_ERR, 0, 1, TRIG_EVENT, events(&[binding(0, 15)]), BadData),
        ("one bad event among good ones", INDEX_MSIX, 0, 3, TRIG_EVENT,
            events(&[binding(0, 0x40), UNBIND - 1, binding(0, 0x41)]), BadData),
        ("trigger on disabled MSI-X", INDEX_MSIX, 0, 1, TRIG_NONE, vec![], NotEnabled),
        ("trigger on disabled MSI", INDEX_MSI, 0, 1, TRIG_BOOL, vec![1], NotEnabled),
        ("mask on disabled MSI-X", INDEX_MSIX, 0, 1, DATA_NONE | ACTION_MASK, vec![], NotEnabled),
    ];
    for (name, index, start, count, flags, data, want) in cases {
        let mut dev = FakeDevice::new(false);
        let got = set_irqs(&mut dev, *index, *start, *count, *flags, data);
        assert_eq!(got, Err(*want), "{name}");
        assert_eq!(want.code(), error::EINVAL, "{name}");
        assert!(dev.calls.is_empty(), "{name}: a refused request does nothing ({:?})", dev.calls);
    }
}

#[test]
fn msi_noresize_and_exclusion_are_ebusy() {
    let mut dev = FakeDevice::new(false);
    // Enable MSI with 3 vectors (the device rounds up to 4), binding vectors 1 and 2.
    let data = events(&[binding(0, 0x40), UNBIND]);
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 1, 2, TRIG_EVENT, &data), Ok(()));
    assert_eq!(
        dev.calls,
        [Call::Enable(IrqIndex::Msi, 3), Call::Bind(IrqIndex::Msi, 1, eb(0, 0x40)), Call::Bind(IrqIndex::Msi, 2, None)]
    );
    dev.calls.clear();
    // Rebinding inside the enabled count is fine; growing is not (NORESIZE).
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 3, 1, TRIG_EVENT, &events(&[binding(1, 0x50)])), Ok(()));
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 3, 2, TRIG_EVENT, &events(&[UNBIND, UNBIND])), Err(IrqError::Busy));
    assert_eq!(IrqError::Busy.code(), error::EBUSY);
    // MSI-X while MSI is enabled.
    assert_eq!(set_irqs(&mut dev, INDEX_MSIX, 0, 1, TRIG_EVENT, &events(&[UNBIND])), Err(IrqError::Busy));
    assert_eq!(dev.calls, [Call::Bind(IrqIndex::Msi, 3, eb(1, 0x50))]);
    // Disable, then grow.
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 0, 0, TRIG_NONE, &[]), Ok(()));
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 0, 8, TRIG_EVENT, &events(&[UNBIND; 8])), Ok(()));
    assert_eq!(dev.enabled(IrqIndex::Msi), 8);
}

#[test]
fn msix_grows_while_enabled() {
    let mut dev = FakeDevice::new(false);
    assert_eq!(set_irqs(&mut dev, INDEX_MSIX, 0, 1, TRIG_EVENT, &events(&[binding(0, 0x40)])), Ok(()));
    assert_eq!(dev.enabled(IrqIndex::Msix), 1);
    dev.calls.clear();
    // Dynamic MSI-X: vector 40 bound while enabled with 1, no re-enable, never EBUSY.
    assert_eq!(
        set_irqs(&mut dev, INDEX_MSIX, 40, 2, TRIG_EVENT, &events(&[binding(1, 0x41), binding(1, 0x42)])),
        Ok(())
    );
    assert_eq!(dev.calls, [Call::Bind(IrqIndex::Msix, 40, eb(1, 0x41)), Call::Bind(IrqIndex::Msix, 41, eb(1, 0x42))]);
    // MSI while MSI-X is enabled.
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 0, 1, TRIG_EVENT, &events(&[UNBIND])), Err(IrqError::Busy));
}

#[test]
fn failed_binding_unwinds_only_what_the_call_enabled() {
    let mut dev = FakeDevice::new(false);
    dev.fail_bind = Some(2);
    let data = events(&[binding(0, 0x40); 4]);
    assert_eq!(set_irqs(&mut dev, INDEX_MSIX, 0, 4, TRIG_EVENT, &data), Err(IrqError::NoSpace));
    assert_eq!(IrqError::NoSpace.code(), error::ENOSPC);
    assert_eq!(dev.calls.last(), Some(&Call::Disable(IrqIndex::Msix)), "enabled by this call: disabled again");
    assert_eq!(dev.enabled(IrqIndex::Msix), 0);
    // Enabled beforehand: a failure does not disable what was there.
    dev.fail_bind = None;
    assert_eq!(set_irqs(&mut dev, INDEX_MSIX, 0, 1, TRIG_EVENT, &events(&[binding(0, 0x40)])), Ok(()));
    dev.fail_bind = Some(5);
    dev.calls.clear();
    assert_eq!(set_irqs(&mut dev, INDEX_MSIX, 4, 2, TRIG_EVENT, &events(&[UNBIND, UNBIND])), Err(IrqError::NoSpace));
    assert!(!dev.calls.contains(&Call::Disable(IrqIndex::Msix)));
    assert_eq!(dev.enabled(IrqIndex::Msix), 1);
    // A failed enable passes its error through and binds nothing.
    let mut dev = FakeDevice::new(false);
    dev.fail_enable = Some(IrqError::NoDevice);
    assert_eq!(set_irqs(&mut dev, INDEX_MSI, 0, 1, TRIG_EVENT, &events(&[UNBIND])), Err(IrqError::NoDevice));
    assert_eq!(dev.calls, [Call::Enable(IrqIndex::Msi, 1)]);
    assert_eq!(IrqError::NoDevice.code(), error::ENODEV);
    assert_eq!(IrqError::Fault.code(), error::EFAULT);
}

#[test]
fn actions() {
    let mut dev = FakeDevice::new(true);
    set_irqs(&mut dev, INDEX_MSI, 0, 4, TRIG_EVENT, &events(&[UNBIND; 4])).unwrap();
    dev.calls.clear();
    set_irqs(&mut dev, INDEX_MSI, 1, 3, DATA_BOOL | ACTION_MASK, &[1, 0, 1]).unwrap();
    set_irqs(&mut dev, INDEX_MSI, 0, 2, DATA_NONE | ACTION_UNMASK, &[]).unwrap();
    set_irqs(&mut dev, INDEX_MSI, 2, 2, TRIG_BOOL, &[0, 1]).unwrap();
    set_irqs(&mut dev, INDEX_MSI, 0, 1, TRIG_NONE, &[]).unwrap();
    set_irqs(&mut dev, INDEX_ERR, 0, 1, TRIG_NONE, &[]).unwrap();
    set_irqs(&mut dev, INDEX_REQ, 0, 1, TRIG_EVENT, &events(&[binding(2, 0x30)])).unwrap();
    set_irqs(&mut dev, INDEX_REQ, 0, 0, TRIG_NONE, &[]).unwrap();
    use IrqIndex::*;
    use MaskState::*;
    assert_eq!(
        dev.calls,
        [
            Call::Mask(Msi, 1, Masked),
            Call::Mask(Msi, 3, Masked),
            Call::Mask(Msi, 0, Unmasked),
            Call::Mask(Msi, 1, Unmasked),
            Call::Trigger(Msi, 3),
            Call::Trigger(Msi, 0),
            Call::Trigger(Err, 0),
            Call::Bind(Req, 0, eb(2, 0x30)),
            Call::Disable(Req),
        ]
    );
    // Disabling a disabled index is fine.
    assert_eq!(set_irqs(&mut dev, INDEX_MSIX, 0, 0, TRIG_NONE, &[]), Ok(()));
}

#[test]
fn parse_reports_data_size() {
    let dev = FakeDevice::new(false);
    let r = SetIrqs::parse(&dev, INDEX_MSIX, 2, MAX_COUNT.min(62), TRIG_EVENT).unwrap();
    assert_eq!(
        (r.index(), r.start(), r.count(), r.data(), r.action()),
        (IrqIndex::Msix, 2, 62, DataKind::Event, Action::Trigger)
    );
    assert_eq!(r.data_bytes(), 62 * 8);
    assert!(!r.is_disable());
    let r = SetIrqs::parse(&dev, INDEX_MSIX, 0, 3, TRIG_BOOL).unwrap();
    assert_eq!(r.data_bytes(), 3);
    let r = SetIrqs::parse(&dev, INDEX_MSIX, 0, 0, TRIG_NONE).unwrap();
    assert!(r.is_disable());
    assert_eq!(r.data_bytes(), 0);
    assert_eq!(EventBinding::decode(binding(7, 0xff)), Ok(eb(7, 0xff)));
    assert_eq!(EventBinding { vcpu: 7, vector: 0xff }.encode(), binding(7, 0xff));
    assert_eq!(EventBinding::decode(UNBIND), Ok(None));
    for i in IrqIndex::ALL {
        assert_eq!(IrqIndex::from_abi(i.abi()), Some(i));
    }
}

/// The documented checks, written out independently of the implementation.
fn reference(dev: &FakeDevice, index: u64, start: u64, count: u64, flags: u64, data: &[u8]) -> Result<(), IrqError> {
    use IrqError::*;
    if index >= 5 {
        return Err(BadIndex);
    }
    let ix = IrqIndex::ALL[index as usize];
    let known = DATA_NONE | DATA_BOOL | DATA_EVENT | ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER;
    let (d, a) = (flags & (DATA_NONE | DATA_BOOL | DATA_EVENT), flags & (ACTION_MASK | ACTION_UNMASK | ACTION_TRIGGER));
    if flags & !known != 0 || d.count_ones() != 1 || a.count_ones() != 1 || (d == DATA_EVENT && a != ACTION_TRIGGER) {
        return Err(BadFlags);
    }
    let n = u64::from(dev.infos[index as usize].count);
    if count > MAX_COUNT || start.checked_add(count).is_none_or(|end| end > n) || start >= n {
        return Err(BadRange);
    }
    if count == 0 && (d, a) != (DATA_NONE, ACTION_TRIGGER) {
        return Err(BadRange);
    }
    let maskable = ix == IrqIndex::Msix || dev.infos[index as usize].flags as u64 & FLAG_MASKABLE != 0;
    if a != ACTION_TRIGGER && !maskable {
        return Err(NotMaskable);
    }
    let len = match d {
        DATA_NONE => 0,
        DATA_BOOL => count,
        _ => count * 8,
    };
    if data.len() as u64 != len {
        return Err(BadData);
    }
    if count == 0 {
        return Ok(());
    }
    if d == DATA_BOOL && data.iter().any(|&b| b > 1) {
        return Err(BadData);
    }
    if d == DATA_EVENT {
        for c in data.chunks(8) {
            let e = u64::from_le_bytes(c.try_into().unwrap());
            if e != UNBIND && (e >> 16 != 0 || e & 0xff < 16) {
                return Err(BadData);
            }
        }
    }
    let msi_family = matches!(ix, IrqIndex::Msi | IrqIndex::Msix);
    if d != DATA_EVENT && msi_family && dev.enabled[index as usize] == 0 {
        return Err(NotEnabled);
    }
    if d == DATA_EVENT && msi_family {
        let other = if ix == IrqIndex::Msi { 2 } else { 1 };
        if dev.enabled[other] != 0 {
            return Err(Busy);
        }
        let now = dev.enabled[index as usize];
        if ix == IrqIndex::Msi && now != 0 && start + count > u64::from(now) {
            return Err(Busy);
        }
    }
    Ok(())
}

fn interesting() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..10,
        60u64..70,
        Just(MAX_COUNT),
        Just(MAX_COUNT + 1),
        Just(u64::MAX),
        Just(u64::MAX - 1),
        any::<u64>()
    ]
}

fn flags() -> impl Strategy<Value = u64> {
    prop_oneof![4 => 0u64..64, 1 => any::<u64>(), 1 => (0u64..64, 6u32..64).prop_map(|(f, b)| f | 1 << b)]
}

fn entry() -> impl Strategy<Value = u64> {
    prop_oneof![
        (any::<u8>(), 16u8..=255).prop_map(|(c, v)| binding(c, v)),
        Just(UNBIND),
        (any::<u8>(), 0u8..16).prop_map(|(c, v)| binding(c, v)),
        any::<u64>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    /// Never panics, and every outcome is the documented one. Requests refused by a check
    /// (not by the device) change nothing.
    #[test]
    fn api_matches_the_documented_checks(
        index in prop_oneof![0u64..6, any::<u64>()],
        start in interesting(),
        count in interesting(),
        flags in flags(),
        bools in proptest::collection::vec(prop_oneof![5 => 0u8..2, 1 => any::<u8>()], 0..80),
        entries in proptest::collection::vec(entry(), 0..80),
        exact_len in prop::bool::weighted(0.9),
        pre_msi in 0u32..3,
        pre_msix in any::<bool>(),
        maskable in any::<bool>(),
    ) {
        let mut dev = FakeDevice::new(maskable);
        dev.enabled[1] = [0, 2, 8][pre_msi as usize];
        dev.enabled[2] = if pre_msix && pre_msi == 0 { 1 } else { 0 };
        // Data of the right length most of the time, so the later checks are reached.
        let want_len = match flags & DATA_MASK {
            DATA_BOOL => count as usize,
            DATA_EVENT => (count as usize).saturating_mul(8),
            _ => 0,
        };
        let mut data: Vec<u8> = if flags & DATA_MASK == DATA_EVENT { events(&entries) } else { bools.clone() };
        if exact_len && want_len <= 8 * 80 {
            data.resize(want_len, 0);
        }
        let want = reference(&dev, index, start, count, flags, &data);
        let got = set_irqs(&mut dev, index, start, count, flags, &data);
        prop_assert_eq!(got, want);
        if got.is_err() {
            prop_assert!(dev.calls.is_empty(), "{:?}", dev.calls);
        }
        if let Err(e) = got {
            prop_assert!([error::EINVAL, error::EBUSY].contains(&e.code()));
        }
        // The info call never panics either.
        let _ = irq_info(&dev, index);
    }
}
