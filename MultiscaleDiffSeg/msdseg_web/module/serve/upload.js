// Send the files of one <input type=file> selection to the server in slices.
// The server answers every call with true (go on) or false (it refused and showed why),
// so a refused upload stops at once and never sends the rest of its bytes.
window.msdsegUpload = async function msdsegUpload(files, triggerName, sliceBytes) {
  const list = Array.from(files || []);
  const id = Date.now().toString(36) + Math.random().toString(36).slice(2);
  const meta = list.map((f) => ({ name: f.name, size: f.size }));
  if (!(await trame.trigger(triggerName, ["begin", id, meta]))) {
    return false;
  }
  for (let index = 0; index < list.length; index++) {
    const file = list[index];
    for (let offset = 0; offset < file.size; offset += sliceBytes) {
      const part = new File([file.slice(offset, offset + sliceBytes)], file.name);
      if (!(await trame.trigger(triggerName, ["data", id, index, offset, part]))) {
        return false;
      }
    }
  }
  return await trame.trigger(triggerName, ["end", id]);
};
