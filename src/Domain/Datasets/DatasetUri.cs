using System.Text.RegularExpressions;

namespace FineTune.Domain.Datasets;

/// <summary>A dataset reference that cannot be used; the message is meant for the API user.</summary>
public sealed class DatasetUriException(string message) : Exception(message);

/// <summary>
/// Resolves a user-given dataset reference (<c>file:///abs/path</c> or an absolute path) to a real local file under
/// one of the allowed roots. The path is resolved the way the OS would (each symlink followed, <c>..</c> applied to the
/// resolved parent), so neither <c>..</c> nor a symlink can lead out of the roots; the returned path contains no
/// symlinks, so opening it reaches the file that was checked.
/// </summary>
public sealed partial class DatasetUri
{
    public const int MaxLength = 2048;
    private const int MaxSymlinkHops = 40;
    private readonly string[] _roots;

    public DatasetUri(IEnumerable<string> allowedRoots)
    {
        _roots = allowedRoots
            .Where(r => !string.IsNullOrWhiteSpace(r))
            .Select(r => RealPath(Path.GetFullPath(r)))
            .ToArray();
    }

    public IReadOnlyList<string> AllowedRoots => _roots;

    /// <summary>Resolves <paramref name="reference"/> or throws <see cref="DatasetUriException"/>.</summary>
    public static string Resolve(string reference, IEnumerable<string> allowedRoots) =>
        new DatasetUri(allowedRoots).Resolve(reference);

    public bool TryResolve(string reference, out string path, out string error)
    {
        try
        {
            path = Resolve(reference);
            error = "";
            return true;
        }
        catch (DatasetUriException e)
        {
            path = "";
            error = e.Message;
            return false;
        }
    }

    public string Resolve(string reference)
    {
        if (string.IsNullOrWhiteSpace(reference))
            throw new DatasetUriException("the dataset reference is empty");
        if (reference.Length > MaxLength)
            throw new DatasetUriException($"the dataset reference is longer than {MaxLength} characters");
        if (reference.Contains('\0'))
            throw new DatasetUriException("the dataset reference contains a NUL character");

        var path = LocalPath(reference);
        if (_roots.Length == 0)
            throw new DatasetUriException("no dataset locations are configured on this server");

        string real;
        try
        {
            real = RealPath(path);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
        {
            throw new DatasetUriException($"the dataset path cannot be resolved: {e.Message}");
        }
        // Checked before existence, so that nothing is revealed about files outside the roots.
        if (!_roots.Any(root => IsUnder(real, root)))
            throw new DatasetUriException(
                $"the dataset path is outside the allowed dataset locations ({string.Join(", ", _roots)})");
        if (Directory.Exists(real))
            throw new DatasetUriException($"the dataset path is a directory, not a file: {reference}");
        if (!File.Exists(real))
            throw new DatasetUriException($"the dataset file was not found: {reference}");
        return real;
    }

    private static string LocalPath(string reference)
    {
        var scheme = SchemePattern().Match(reference);
        // "C:\..." on Windows is a drive, not a scheme.
        if (scheme.Success && !(OperatingSystem.IsWindows() && scheme.Groups[1].Value.Length == 1))
        {
            var name = scheme.Groups[1].Value.ToLowerInvariant();
            if (name is "http" or "https")
                throw new DatasetUriException(
                    $"{name}:// dataset URIs are not supported in this version; place the file under an allowed " +
                    "dataset location and pass file:///absolute/path or the absolute path");
            if (name != "file")
                throw new DatasetUriException(
                    $"unsupported dataset URI scheme \"{name}\"; use file:///absolute/path or an absolute path");
            if (!Uri.TryCreate(reference, UriKind.Absolute, out var uri) || !uri.IsFile)
                throw new DatasetUriException("the dataset reference is not a valid file:// URI");
            if (!string.IsNullOrEmpty(uri.Host) && !uri.Host.Equals("localhost", StringComparison.OrdinalIgnoreCase))
                throw new DatasetUriException($"file:// URIs with a host (\"{uri.Host}\") are not supported; use file:///absolute/path");
            if (!string.IsNullOrEmpty(uri.Query) || !string.IsNullOrEmpty(uri.Fragment))
                throw new DatasetUriException("the dataset URI must not have a query or fragment");
            // LocalPath turns file://localhost/x into a UNC-style path on Unix; the decoded path part is what is meant.
            return OperatingSystem.IsWindows() ? uri.LocalPath : Uri.UnescapeDataString(uri.AbsolutePath);
        }
        if (!Path.IsPathFullyQualified(reference))
            throw new DatasetUriException("the dataset path must be absolute (or a file:/// URI)");
        return reference;
    }

    private static bool IsUnder(string path, string root)
    {
        var cmp = OperatingSystem.IsWindows() ? StringComparison.OrdinalIgnoreCase : StringComparison.Ordinal;
        if (path.Equals(root, cmp)) return true;
        var prefix = Path.EndsInDirectorySeparator(root) ? root : root + Path.DirectorySeparatorChar;
        return path.StartsWith(prefix, cmp);
    }

    /// <summary>The path with every symlink resolved, component by component, like realpath(3); components that
    /// do not exist are kept as they are.</summary>
    public static string RealPath(string path)
    {
        var root = Path.GetPathRoot(path);
        if (string.IsNullOrEmpty(root)) throw new ArgumentException("the path is not absolute");
        var pending = new LinkedList<string>(Split(path[root.Length..]));
        var current = root;
        var hops = 0;
        while (pending.First is { } first)
        {
            var part = first.Value;
            pending.RemoveFirst();
            if (part is "" or ".") continue;
            if (part == "..")
            {
                current = Path.GetDirectoryName(current) ?? root;
                continue;
            }
            var next = Path.Join(current, part);
            var target = new FileInfo(next).LinkTarget;
            if (target is null)
            {
                current = next;
                continue;
            }
            if (++hops > MaxSymlinkHops)
                throw new IOException("too many levels of symbolic links");
            var targetRoot = Path.GetPathRoot(target);
            if (!string.IsNullOrEmpty(targetRoot))
            {
                root = targetRoot;
                current = root;
                target = target[root.Length..];
            }
            var targetParts = Split(target);
            for (var i = targetParts.Length - 1; i >= 0; i--) pending.AddFirst(targetParts[i]);
        }
        return current;
    }

    private static string[] Split(string p) =>
        p.Split([Path.DirectorySeparatorChar, Path.AltDirectorySeparatorChar], StringSplitOptions.RemoveEmptyEntries);

    [GeneratedRegex(@"^([A-Za-z][A-Za-z0-9+.\-]*):")]
    private static partial Regex SchemePattern();
}
