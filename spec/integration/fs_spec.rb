# frozen_string_literal: true

require "digest"
require "pathname"
require "tmpdir"

# One VM serves all examples here: booting under TCG takes seconds.
RSpec.describe "Sandbox#fs in a real VM" do
  before(:all) do
    @sb = Microsandbox::Sandbox.create(unique_name("fs"), image: rootfs)
  end

  after(:all) { @sb&.kill }

  FS_JOIN = ->(dir, name) { "#{dir.b}/".b + name.b }

  let(:sb) { @sb }
  let(:fs) { @sb.fs }
  let(:dir) { "/tmp/#{SecureRandom.hex(4)}" }

  before { fs.mkdir(dir) }

  it "round-trips all 256 byte values and reads text as UTF-8" do
    data = (0..255).map(&:chr).join.b * 3
    expect(fs.write("#{dir}/bytes", data)).to eq(768)
    got = fs.read("#{dir}/bytes")
    expect(got).to eq(data)
    expect(got.encoding).to eq(Encoding::BINARY)
    expect(sb.exec("wc", ["-c", "#{dir}/bytes"]).stdout.split.first).to eq("768")

    fs.write("#{dir}/text", "héllo ✓")
    text = fs.read_text("#{dir}/text")
    expect(text).to eq("héllo ✓")
    expect(text.encoding).to eq(Encoding::UTF_8)
    fs.write("#{dir}/text", "")
    expect(fs.read("#{dir}/text")).to eq("")
    expect(fs.read_text("#{dir}/text")).to eq("")

    # Never an invalid String (a later `=~` would raise), never a byte replaced: it raises.
    fs.write("#{dir}/latin1", "caf\xE9\n".b)
    expect { fs.read_text("#{dir}/latin1") }.to raise_error(Microsandbox::FilesystemError, /not valid UTF-8.*fs\.read/)
    expect(fs.read("#{dir}/latin1")).to eq("caf\xE9\n".b)
  end

  it "answers exists? without raising" do
    fs.write("#{dir}/f", "x")
    expect(fs.exists?("#{dir}/f")).to be(true)
    expect(fs.exists?(dir)).to be(true)
    expect(fs.exists?("#{dir}/missing")).to be(false)
    expect(fs.exists?("#{dir}/f/below-a-file")).to be(false)
  end

  it "creates directories with parents, and accepts an existing one" do
    fs.mkdir("#{dir}/a/b/c")
    expect(fs.stat("#{dir}/a/b/c").directory?).to be(true)
    expect { fs.mkdir("#{dir}/a/b/c") }.not_to raise_error
    expect { fs.mkdir("#{dir}/a/b/c", parents: false) }
      .to raise_error(Microsandbox::FilesystemError, /EEXIST/)
    expect { fs.mkdir("#{dir}/x/y", parents: false) }
      .to raise_error(Microsandbox::FilesystemError, /ENOENT/)
  end

  it "lists entries with kinds, sizes and modes" do
    fs.write("#{dir}/file", "12345")
    fs.mkdir("#{dir}/sub")
    sb.exec("ln", ["-s", "file", "#{dir}/link"])
    sb.exec("mkfifo", ["#{dir}/fifo"])
    entries = fs.list(dir)
    expect(entries.map(&:name)).to eq(%w[fifo file link sub])
    by_name = entries.to_h { |e| [e.name, e] }
    expect(by_name["file"]).to have_attributes(kind: :file, size: 5, path: "#{dir}/file", mode: 0o644)
    expect(by_name["sub"]).to have_attributes(kind: :directory, mode: 0o755)
    expect(by_name["link"].kind).to eq(:symlink)
    expect(by_name["fifo"].kind).to eq(:other)
    expect(fs.list("#{dir}/sub")).to eq([])
  end

  it "stats paths: kind, size, mode, owner and mtime" do
    sb.exec("sh", ["-c", "echo -n abc > #{dir}/s && chmod 640 #{dir}/s && chown 65534:65534 #{dir}/s && touch -d @1700000000 #{dir}/s"])
    st = fs.stat("#{dir}/s")
    expect(st).to have_attributes(kind: :file, size: 3, mode: 0o640, uid: 65_534, gid: 65_534)
    expect(st.mtime).to be_a(Time)
    expect(st.mtime.to_i).to eq(1_700_000_000)
    expect(st.file?).to be(true)
    expect(st.symlink?).to be(false)
    sb.exec("ln", ["-s", "s", "#{dir}/l"])
    expect(fs.stat("#{dir}/l").symlink?).to be(true)
    now = fs.stat(dir).mtime
    expect((Time.now - now).abs).to be < 3600
  end

  it "copies and renames inside the guest" do
    fs.write("#{dir}/src", "payload")
    sb.exec("chmod", ["600", "#{dir}/src"])
    fs.copy("#{dir}/src", "#{dir}/copy")
    expect(fs.read("#{dir}/copy")).to eq("payload")
    expect(fs.stat("#{dir}/copy").mode).to eq(0o600)
    fs.rename("#{dir}/copy", "#{dir}/moved")
    expect(fs.exists?("#{dir}/copy")).to be(false)
    expect(fs.read("#{dir}/moved")).to eq("payload")
    expect { fs.copy("#{dir}/nope", "#{dir}/x") }.to raise_error(Microsandbox::FilesystemError, /ENOENT/)
  end

  it "removes files and, only when recursive, whole trees" do
    fs.mkdir("#{dir}/t/a")
    fs.write("#{dir}/t/a/file", "x")
    fs.write("#{dir}/single", "x")
    fs.remove("#{dir}/single")
    expect(fs.exists?("#{dir}/single")).to be(false)
    expect { fs.remove("#{dir}/t") }.to raise_error(Microsandbox::FilesystemError, /ENOTEMPTY/) { |e|
      expect(e.errno).to eq(Errno::ENOTEMPTY::Errno)
    }
    fs.remove("#{dir}/t", recursive: true)
    expect(fs.exists?("#{dir}/t")).to be(false)
  end

  it "raises FilesystemError with the path, errno name and errno (PathNotFoundError for ENOENT)" do
    expect { fs.read("#{dir}/missing") }.to raise_error(Microsandbox::PathNotFoundError) { |e|
      expect(e).to be_a(Microsandbox::FilesystemError)
      expect(e.message).to include("#{dir}/missing", "ENOENT", "No such file or directory")
      expect(e.code).to eq("path-not-found")
      expect(e.errno).to eq(Errno::ENOENT::Errno)
    }
    fs.write("#{dir}/plain", "x")
    expect { fs.mkdir("#{dir}/plain") }.to raise_error(Microsandbox::FilesystemError, /EEXIST/) { |e|
      expect(e.code).to eq("filesystem-error")
    }
    expect { fs.mkdir("#{dir}/plain", parents: false) }.to raise_error(Microsandbox::FilesystemError, /EEXIST/)
    expect { fs.read(dir) }.to raise_error(Microsandbox::FilesystemError, /EISDIR/)
    expect { fs.list("#{dir}/plain") }.to raise_error(Microsandbox::FilesystemError, /ENOTDIR/)
    expect { fs.write("#{dir}/no/such/dir/f", "x") }.to raise_error(Microsandbox::FilesystemError, /ENOENT/)
  end

  it "treats names and paths as bytes end to end: \\xFF, newlines, spaces, non-UTF-8 directories" do
    odd = ["a\xFF".b, "new\nline", "with space", "caf\xC3\xA9", "\xFE\xFF".b]
    sub = "#{dir}/d\xFFir".b # a directory whose name is not UTF-8
    fs.mkdir(sub)
    odd.each_with_index { |name, i| fs.write(FS_JOIN.call(sub, name), "content #{i}") }
    entries = fs.list(sub)
    expect(entries.map { |e| e.name.b }).to match_array(odd.map(&:b))
    by_name = entries.to_h { |e| [e.name.b, e] }
    expect(by_name["a\xFF".b].name.encoding).to eq(Encoding::BINARY)
    expect(by_name["with space"].name).to eq("with space")
    expect(by_name["with space"].name.encoding).to eq(Encoding::UTF_8)
    expect(by_name["caf\xC3\xA9".b].name).to eq("café")
    # Each listed path reads back its own file (no U+FFFD, no ENOENT).
    odd.each_with_index do |name, i|
      e = by_name[name.b]
      expect(e.path.b).to eq(FS_JOIN.call(sub, name).b)
      expect(fs.read(e.path)).to eq("content #{i}")
      expect(fs.stat(e.path).size).to eq("content #{i}".bytesize)
      expect(fs.exists?(e.path)).to be(true)
    end
    # The guest sees the same bytes.
    seen = sb.exec("sh", ["-c", "cd #{dir}/d*ir && find . -type f -print0"]).stdout_bytes.split("\0")
    expect(seen.map { |f| f.delete_prefix("./") }).to match_array(odd.map(&:b))
    # Rename, copy, remove and host copies of such names.
    src = FS_JOIN.call(sub, "a\xFF".b)
    fs.rename(src, FS_JOIN.call(sub, "b\xFF\n".b))
    expect(fs.exists?(src)).to be(false)
    fs.copy(FS_JOIN.call(sub, "b\xFF\n".b), FS_JOIN.call(sub, "c\xFF".b))
    expect(fs.read(FS_JOIN.call(sub, "c\xFF".b))).to eq("content 0")
    Dir.mktmpdir do |host|
      host_file = File.join(host.b, "h\xFF".b)
      expect(fs.copy_to_host(FS_JOIN.call(sub, "c\xFF".b), host_file)).to eq(9)
      expect(File.binread(host_file)).to eq("content 0")
      expect(Dir.children(host.b).map(&:b)).to eq(["h\xFF".b])
      fs.copy_from_host(host_file, FS_JOIN.call(sub, "up\xFF".b))
      expect(fs.read(FS_JOIN.call(sub, "up\xFF".b))).to eq("content 0")
    end
    fs.remove(FS_JOIN.call(sub, "c\xFF".b))
    expect(fs.exists?(FS_JOIN.call(sub, "c\xFF".b))).to be(false)
    # Streams take such paths too.
    fs.write_stream(FS_JOIN.call(sub, "s\xFF".b)) { |w| w.write("streamed") }
    expect(fs.read_stream(FS_JOIN.call(sub, "s\xFF".b)).to_a.join).to eq("streamed")
    # Errors name the exact path, escaped, in a valid UTF-8 message.
    expect { fs.read(FS_JOIN.call(sub, "gone\xFF\n".b)) }.to raise_error(Microsandbox::FilesystemError) { |e|
      expect(e.message).to include("d\\xFFir/gone\\xFF\\n", "ENOENT")
      expect(e.message.valid_encoding?).to be(true)
    }
    fs.remove(sub, recursive: true)
    expect(fs.exists?(sub)).to be(false)
  end

  it "rejects bad paths and data before sending anything" do
    expect { fs.read("/tmp/a\0b") }.to raise_error(Microsandbox::InvalidConfigError, /NUL/)
    expect { fs.write("/tmp/a\0b", "x") }.to raise_error(Microsandbox::InvalidConfigError, /NUL/)
    expect { fs.rename("/tmp/a", "/tmp/\0") }.to raise_error(Microsandbox::InvalidConfigError, /NUL/)
    expect { fs.read("relative/path") }.to raise_error(Microsandbox::InvalidConfigError, /absolute/)
    expect { fs.write("/tmp/x", 42) }.to raise_error(TypeError, /String/)
    expect { fs.write("/tmp/x", nil) }.to raise_error(TypeError)
    expect { fs.read(:sym) }.to raise_error(TypeError)
    expect(sb.exec("true").success?).to be(true) # the session channel is fine
  end

  it "copies multi-MiB files from and to the host byte-exact" do
    Dir.mktmpdir do |tmp|
      src = File.join(tmp, "src.bin")
      data = Random.bytes((5 << 20) + 12_345)
      File.binwrite(src, data)
      expect(fs.copy_from_host(src, "#{dir}/up.bin")).to eq(data.bytesize)
      sum = sb.exec("sha256sum", ["#{dir}/up.bin"]).stdout.split.first
      expect(sum).to eq(Digest::SHA256.hexdigest(data))
      back = File.join(tmp, "back.bin")
      expect(fs.copy_to_host("#{dir}/up.bin", back)).to eq(data.bytesize)
      expect(File.binread(back)).to eq(data)

      expect { fs.copy_to_host("#{dir}/missing", File.join(tmp, "none")) }
        .to raise_error(Microsandbox::FilesystemError, /ENOENT/)
      expect(File.exist?(File.join(tmp, "none"))).to be(false)
      expect { fs.copy_from_host(File.join(tmp, "none"), "#{dir}/x") }.to raise_error(Microsandbox::HostIOError)
    end
  end

  it "streams ~64 MiB each way in bounded Ruby memory" do
    size = 64 << 20
    chunk = Random.bytes(1 << 20)
    sent = Digest::SHA256.new
    written = fs.write_stream("#{dir}/big") do |sink|
      (size / chunk.bytesize).times do |i|
        piece = chunk.byteslice(0, chunk.bytesize - 1) + i.chr # vary every chunk
        sent << piece
        sink.write(piece)
      end
      sink.written # the block's value is write_stream's value
    end
    expect(written).to eq(size)
    expect(fs.stat("#{dir}/big").size).to eq(size)

    GC.start
    rss_before = rss_kib
    got = Digest::SHA256.new
    total = 0
    max_chunk = 0
    peak = 0
    fs.read_stream("#{dir}/big") do |c|
      got << c
      total += c.bytesize
      max_chunk = c.bytesize if c.bytesize > max_chunk
      # Collect the consumed chunks now and then, so RSS shows what the stream itself
      # holds rather than how lazily Ruby's GC frees garbage strings.
      if (total % (8 << 20)).zero?
        GC.start
        peak = [peak, rss_kib - rss_before].max
      end
    end
    expect(total).to eq(size)
    expect(got.hexdigest).to eq(sent.hexdigest)
    expect(max_chunk).to be <= 4 << 20
    # Reading 64 MiB must never have held much of it in memory. The bar leaves room for
    # the allocator's per-thread arenas of the native transfer threads (one run under
    # load peaked past 24 MiB), and is still far below the file's 64 MiB.
    expect(peak).to be < 40 * 1024

    stream = fs.read_stream("#{dir}/big")
    expect(stream).to be_a(Enumerable)
    expect(stream.first.bytesize).to be <= 4 << 20 # leaving early cancels the transfer
    expect(sb.exec("true").success?).to be(true)
    # The cancelled stream gave its transfer window back: big transfers still work.
    expect(fs.read("#{dir}/big").bytesize).to eq(size)
  end

  # Bytes the guest read from / wrote to the transfer disk so far (/sys/block/*/stat
  # counts 512-byte sectors).
  def transfer_disk_bytes
    out = sb.exec("sh", ["-c", <<~SH]).stdout
      for b in /sys/block/*; do [ "$(cat $b/serial 2>/dev/null)" = msb.transfer ] && cat $b/stat; done
    SH
    fields = out.split.map(&:to_i)
    raise "no transfer disk in the guest: #{out.inspect}" if fields.size < 7

    { read: fields[2] * 512, written: fields[6] * 512 }
  end

  it "moves a 64 MiB random file through the transfer disk byte-exact each way" do
    data = Random.bytes((64 << 20) + 4321) # an unaligned tail too
    before = transfer_disk_bytes
    expect(fs.write("#{dir}/rand", data)).to eq(data.bytesize)
    after_write = transfer_disk_bytes
    # The guest took the bytes from the transfer disk, not from frames.
    expect(after_write[:read] - before[:read]).to be >= data.bytesize
    expect(sb.exec("sha256sum", ["#{dir}/rand"]).stdout.split.first).to eq(Digest::SHA256.hexdigest(data))

    expect(fs.read("#{dir}/rand") == data).to be(true)
    expect(transfer_disk_bytes[:written] - after_write[:written]).to be >= data.bytesize

    Dir.mktmpdir do |tmp|
      back = File.join(tmp, "back.bin")
      expect(fs.copy_to_host("#{dir}/rand", back)).to eq(data.bytesize)
      expect(File.binread(back) == data).to be(true)
      flipped = data.reverse
      File.binwrite(back, flipped)
      expect(fs.copy_from_host(back, "#{dir}/rand")).to eq(data.bytesize)
      expect(sb.exec("sha256sum", ["#{dir}/rand"]).stdout.split.first).to eq(Digest::SHA256.hexdigest(flipped))
    end

    # Small files stay on frames.
    quiet = transfer_disk_bytes
    fs.write("#{dir}/small", "x" * 1000)
    expect(fs.read("#{dir}/small")).to eq("x" * 1000)
    expect(transfer_disk_bytes).to eq(quiet)
  end

  it "keeps concurrent large transfers apart, more of them than transfer windows" do
    files = Array.new(6) { |i| ["#{dir}/c#{i}", Random.bytes((6 << 20) + (i * 1000))] }
    files.map { |path, data| Thread.new { fs.write(path, data) } }.each(&:join)
    files.each do |path, data|
      expect(sb.exec("sha256sum", [path]).stdout.split.first).to eq(Digest::SHA256.hexdigest(data))
    end
    got = files.map { |path, _| Thread.new { fs.read(path) } }.map(&:value)
    expect(got.zip(files).all? { |g, (_, data)| g == data }).to be(true)
  end

  it "abandons a write_stream whose block raises, and refuses writes after it" do
    sink = nil
    expect do
      fs.write_stream("#{dir}/aborted") do |s|
        sink = s
        s.write("partial")
        raise ArgumentError, "boom"
      end
    end.to raise_error(ArgumentError, "boom")
    expect { sink.write("more") }.to raise_error(Microsandbox::FilesystemError, /closed/)
    expect { fs.write_stream("#{dir}/x") { |s| s.write(1) } }.to raise_error(TypeError)
  end

  it "speaks the reference gem's names: type, modified, readonly?, created, remove_dir, read, close" do
    fs.write("#{dir}/f", "data")
    sb.exec("chmod", ["0444", "#{dir}/f"])
    sb.exec("touch", ["-d", "2001-02-03 04:05:06", "#{dir}/f"])
    fs.mkdir("#{dir}/sub/deeper")
    entries = fs.list(dir).to_h { |e| [e.name, e] }
    expect([entries["f"].type, entries["sub"].type]).to eq(%i[file directory])
    expect(entries["f"].modified).to eq(Time.utc(2001, 2, 3, 4, 5, 6))
    meta = fs.stat("#{dir}/f")
    expect([meta.type, meta.modified, meta.readonly?]).to eq([:file, Time.utc(2001, 2, 3, 4, 5, 6), true])
    expect(fs.stat(dir).readonly?).to be(false)
    created = meta.created
    expect(created).to be_nil.or(be_within(600).of(Time.now))

    expect(fs.read_stream("#{dir}/f").read).to eq("data".b)
    expect(fs.read(Pathname.new("#{dir}/f"))).to eq("data".b) # Pathname paths, as the reference takes
    big = Random.bytes((9 << 20) + 7)
    fs.write("#{dir}/big", big)
    expect(fs.read_stream("#{dir}/big").read).to eq(big)

    expect(fs.write_stream("#{dir}/w") { |s| s.write("abc") && :done }).to eq(:done)
    sink = fs.write_stream("#{dir}/manual")
    sink.write("12")
    sink << "34"
    expect(sink.close).to be_nil
    expect(sink.close).to be_nil # idempotent
    expect(fs.read("#{dir}/manual")).to eq("1234")
    expect(fs.read("#{dir}/w")).to eq("abc")

    expect(fs.remove_dir("#{dir}/sub")).to be_nil
    expect(fs.exists?("#{dir}/sub")).to be(false)
    expect { fs.remove_dir("#{dir}/sub") }.to raise_error(Microsandbox::FilesystemError, /ENOENT/)
  end

  def rss_kib
    File.read("/proc/self/status")[/VmRSS:\s+(\d+)/, 1].to_i
  end
end
